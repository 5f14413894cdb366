//! Integration tests of the Redis store against a real server (each test under its own key
//! prefix; see `support`).

mod conformance;
mod durability;
mod lookup;
mod outage;
mod ratelimit;
mod store;
mod support;
