//! Placeholder: the redis KeyStore is being written.
