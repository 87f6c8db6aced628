//! Whole task suites: building them from a Python package by mutation ([`build`], with
//! [`mutate`]), importing SWE-bench datasets ([`import`]), validating every task through its
//! executor ([`validate`]) and grading a file of predictions as the official harness does
//! ([`evaluate`]). These sit above the executors; one task's fields, grading and protection
//! are [`crate::tasks`].

pub mod build;
pub mod evaluate;
pub mod import;
pub mod mutate;
pub mod validate;
