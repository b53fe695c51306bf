//! Support for the end-to-end tests: where the daxvisor binary is, and how to run it like a user.

pub mod lab;
