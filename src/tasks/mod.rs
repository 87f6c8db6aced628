//! Task instances (SWE-bench fields + a local environment), suites and grading.

pub mod build;
pub mod grade;
pub mod instance;
pub mod mutate;
pub mod protect;
pub mod pytest;
pub mod validate;

pub use instance::{load_suite, TaskInstance};
