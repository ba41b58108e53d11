//! The upgrade machine alone, against a virtual clock and scripted fake clients.

mod props;
mod scripted;
mod sim;
