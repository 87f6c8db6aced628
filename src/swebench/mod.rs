//! SWE-bench as the official harness defines it: dataset rows (SWE-bench full/Lite/Verified,
//! SWE-Gym, SWE-smith) imported into protege suites of docker tasks, eval scripts, the log
//! parsers and the verdict. `../shared/notes/swebench-harness.md` sums up the harness; every
//! rule here names the harness function it follows.

pub mod grading;
pub mod parsers;
pub mod script;

pub use grading::EvalType;
pub use parsers::{check_parser, parse_log, StatusMap};

/// The docker-safe form of an instance id in the SWE-bench image names: lowercased, `__`
/// replaced by `sep` (`_1776_` for SWE-bench, `_s_` for SWE-Gym).
pub fn docker_id(instance_id: &str, sep: &str) -> String {
    instance_id.to_lowercase().replace("__", sep)
}

#[cfg(test)]
mod tests {
    #[test]
    fn image_names_follow_the_datasets() {
        assert_eq!(super::docker_id("django__django-11099", "_1776_"), "django_1776_django-11099");
        assert_eq!(super::docker_id("Foo__Bar-1", "_s_"), "foo_s_bar-1");
    }
}
