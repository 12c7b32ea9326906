//! The gRPC transports, `sluicegate.v1` ShouldAllow and Envoy RLS v3: conversion between protos and
//! [`sluicegate_core`], input checks, and the one place where errors become `tonic::Status`.

mod envoy;
mod error;
mod pipeline;
mod should_allow;

pub use envoy::{EnvoyApi, EnvoySettings, HeaderNames, MAX_DESCRIPTOR_ENTRIES};
pub use error::ApiError;
pub use should_allow::{ShouldAllowApi, ShouldAllowSettings, bucket_key};
