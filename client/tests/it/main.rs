//! The client crate's integration tests, one binary: the library (typed client, tower layer) and
//! the `sluicegate-load` binary against a real sluicegate.

mod concurrency;
mod layer;
mod leased;
mod load;
mod support;
