//! A bucket's shape (capacity and refill rate) and the checks every shape must pass.

use super::bucket::MAX_MS;

/// The largest capacity or rate any shape may have (the README's "The token bucket"). Below 2^53 a cost of 1 still
/// changes the token count exactly; MAX_CAPACITY and MAX_RATE cannot be set higher.
pub const MAX_SHAPE: f64 = 1e15;

/// How large a bucket is and how fast it refills. Both are finite and strictly positive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    capacity: f64,
    rate: f64,
}

/// The largest shape a caller may ask for (MAX_CAPACITY, MAX_RATE).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub max_capacity: f64,
    pub max_rate: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_capacity: 1e9,
            max_rate: 1e9,
        }
    }
}

/// Why a shape was refused; `field` names the offending input so callers can report it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field} {reason}")]
pub struct InvalidShape {
    pub field: &'static str,
    pub reason: String,
}

impl Shape {
    /// A shape from trusted values (configuration already validated, rules already parsed):
    /// finite, greater than 0 and at most [`MAX_SHAPE`].
    ///
    /// Returns an error instead of panicking so that a bad rule can never take a request down.
    pub fn new(capacity: f64, rate: f64) -> Result<Self, InvalidShape> {
        check_bounded("capacity", capacity)?;
        check_bounded("rate", rate)?;
        Ok(Self { capacity, rate })
    }

    /// A shape asked for by a caller: as [`Shape::new`], and within `limits`.
    pub fn within(capacity: f64, rate: f64, limits: &Limits) -> Result<Self, InvalidShape> {
        let shape = Self::new(capacity, rate)?;
        if capacity > limits.max_capacity {
            return Err(InvalidShape {
                field: "capacity",
                reason: format!("must be at most {} (MAX_CAPACITY)", limits.max_capacity),
            });
        }
        if rate > limits.max_rate {
            return Err(InvalidShape {
                field: "rate",
                reason: format!("must be at most {} (MAX_RATE)", limits.max_rate),
            });
        }
        Ok(shape)
    }

    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Milliseconds an empty bucket needs to fill up: `ceil(capacity / rate * 1000)`, at least 1 and
    /// at most 2^53 - 1 (exact in a double, and in Lua). It bounds the refill of one step and is the
    /// shortest TTL of a stored bucket.
    pub fn full_refill_ms(&self) -> u64 {
        let ms = (self.capacity / self.rate * 1000.0).ceil();
        // `as` saturates; the clamp keeps the value exact in a double.
        (ms as u64).clamp(1, MAX_MS)
    }
}

fn check_bounded(field: &'static str, value: f64) -> Result<(), InvalidShape> {
    if !(value.is_finite() && value > 0.0) {
        return Err(InvalidShape {
            field,
            reason: format!("must be a finite number greater than 0, got {value}"),
        });
    }
    if value > MAX_SHAPE {
        return Err(InvalidShape {
            field,
            reason: format!("must be at most {MAX_SHAPE:e}, got {value:e}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_refill_rounds_up_and_is_bounded() {
        assert_eq!(Shape::new(20.0, 20.0).unwrap().full_refill_ms(), 1000);
        assert_eq!(Shape::new(10.0, 3.0).unwrap().full_refill_ms(), 3334);
        assert_eq!(Shape::new(1.0, 1e9).unwrap().full_refill_ms(), 1);
        assert_eq!(Shape::new(1e9, 1e-12).unwrap().full_refill_ms(), MAX_MS);
    }

    #[test]
    fn bad_shapes_name_the_field() {
        for (c, r, field) in [
            (0.0, 1.0, "capacity"),
            (-1.0, 1.0, "capacity"),
            (f64::NAN, 1.0, "capacity"),
            (f64::INFINITY, 1.0, "capacity"),
            (1.0, 0.0, "rate"),
            (1.0, f64::NEG_INFINITY, "rate"),
            (2e15, 1.0, "capacity"),
            (9007199254740993.0, 1.0, "capacity"),
            (1.0, 1.5e15, "rate"),
        ] {
            assert_eq!(Shape::new(c, r).unwrap_err().field, field, "{c} {r}");
        }
        let limits = Limits {
            max_capacity: 100.0,
            max_rate: 10.0,
        };
        assert_eq!(
            Shape::within(101.0, 1.0, &limits).unwrap_err().field,
            "capacity"
        );
        assert_eq!(
            Shape::within(100.0, 10.5, &limits).unwrap_err().field,
            "rate"
        );
        assert!(Shape::within(100.0, 10.0, &limits).is_ok());
    }
}
