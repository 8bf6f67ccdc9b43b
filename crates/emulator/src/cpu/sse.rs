//! Placeholder.

use iced_x86::Instruction;

use super::op::Handler;

pub fn select(_inst: &Instruction) -> Option<Handler> {
    None
}
