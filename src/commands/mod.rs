//! One module per subcommand.

pub mod ls;
pub mod reap;
pub mod run;
