//! Mask expressions and the block schedule.
//!
//! `MaskExpr::parse(text)` -> `expr.bind(shape, docs)` -> `BoundMask` -> `bound.schedule(tq, tk)`.
//! A [`BoundMask`] is the element reference (`allowed(b, i, j)`), the row-bit evaluator the kernels
//! use inside Partial tiles ([`RowMask`]), and the schedule builder (interval reasoning over tiles).
pub mod schedule;

pub use schedule::{BlockSchedule, RowMask, TileEntry, TileKind};
