//! modkit's Raspberry Pi demo: a query image, the task it searches by, the best
//! gallery matches and per-stage timings, drawn with embedded-graphics.
//!
//! * [`screen`]: the layout, drawn on any `DrawTarget<Color = Rgb888>`.
//! * [`fb`]: the Linux framebuffer (RGB565 / XRGB8888) as a `DrawTarget`; PNG
//!   output uses [`modkit_runtime::canvas::RgbCanvas`].
//! * [`app`]: queries (a [`app::QuerySource`]), the trunk once per query, one
//!   tail and a search per task.

pub mod app;
pub mod fb;
pub mod screen;
