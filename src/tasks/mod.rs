//! Task instances (SWE-bench fields + a local environment), suites and grading.

pub mod grade;
pub mod instance;
pub mod protect;
pub mod pytest;

pub use instance::{load_suite, TaskInstance};
