//! Task instances (SWE-bench fields + a local environment), suites and grading.

pub mod grade;
pub mod instance;

pub use instance::{load_suite, TaskInstance};
