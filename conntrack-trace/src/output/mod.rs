//! Renderers: one module per output format.

pub mod json;
pub mod text;

use std::io;

use crate::{summary::Summary, verdict::Record};

pub trait Output {
    fn event(&mut self, r: &Record) -> io::Result<()>;
    /// `n` events the kernel could not put in the ring buffer since the last report.
    fn lost(&mut self, n: u64) -> io::Result<()>;
    fn summary(&mut self, s: &Summary) -> io::Result<()>;
}
