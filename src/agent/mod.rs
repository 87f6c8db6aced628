//! The agent harness: episodes, tools, the sandbox, experts, policies, the loop detector, and
//! the trajectory files it writes.

pub mod episode;
pub mod expert;
pub mod experts;
pub mod http;
pub mod loops;
pub mod policy;
pub mod remote;
pub mod teacher;
pub mod toolcall;
pub mod tools;
pub mod trajectory;
