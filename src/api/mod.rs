//! The gRPC transports: conversion between protos and [`crate::core`], input checks, and the one
//! place where errors become `tonic::Status`.

mod error;
mod should_allow;

pub use error::ApiError;
pub use should_allow::{Defaults, ShouldAllowApi};
