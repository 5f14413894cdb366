//! Placeholder: the postgres KeyStore is being written.
