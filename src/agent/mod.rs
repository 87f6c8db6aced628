//! The agent harness (episodes, tools, experts) and the trajectory files it writes.

pub mod trajectory;
