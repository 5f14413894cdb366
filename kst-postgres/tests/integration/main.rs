//! Integration tests of the PostgreSQL store against a real server (each test in its own
//! database; see `support`).

mod conformance;
mod hosts;
mod index;
mod lookup_cost;
mod outage;
mod ratelimit;
mod store;
mod support;
