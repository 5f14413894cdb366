//! Integration tests of the filesystem store: the conformance suite, several instances and
//! several processes on one directory, and what the files on disk look like.

mod conformance;
mod files;
mod index;
mod pool;
mod processes;
mod support;
