//! Mask expressions and the block schedule.
//!
//! `MaskExpr::parse(text)` -> `expr.bind(shape, docs)` -> `BoundMask` -> `bound.schedule(tq, tk)`.
//! A [`BoundMask`] is the element reference (`allowed(b, i, j)`), the row-bit evaluator the kernels
//! use inside Partial tiles ([`RowMask`]), and the schedule builder (interval reasoning over tiles).
//! The language and the builder are described in `docs/MASKS.md`.
pub mod bind;
pub mod build;
pub mod codegen;
pub mod expr;
pub mod parse;
pub mod patch;
pub mod render;
pub mod schedule;

pub use bind::BoundMask;
pub use expr::{DocIds, MaskExpr, MaskShape};
pub use render::{explain, render_ascii, tile_grid};
pub use schedule::{BlockSchedule, ColumnEntry, RowMask, ScheduleColumns, TileEntry, TileKind};
