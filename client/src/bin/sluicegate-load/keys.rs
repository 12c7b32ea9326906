//! Which key each request uses: uniform or Zipf over `--keys` keys.

use rand::Rng;
use rand_distr::{Distribution, Zipf};

#[derive(Clone)]
pub struct KeyChooser {
    names: Vec<String>,
    zipf: Option<Zipf<f64>>,
}

impl KeyChooser {
    pub fn new(count: usize, prefix: &str, zipf: Option<f64>) -> Result<Self, String> {
        let zipf = zipf
            .map(|s| Zipf::new(count as f64, s).map_err(|e| format!("--zipf: {e}")))
            .transpose()?;
        Ok(Self {
            names: (0..count).map(|i| format!("{prefix}{i}")).collect(),
            zipf,
        })
    }

    pub fn name(&self, i: u32) -> &str {
        &self.names[i as usize]
    }

    /// A key's index and name.
    pub fn pick(&self, rng: &mut impl Rng) -> (u32, &str) {
        let i = match &self.zipf {
            // Zipf samples 1..=n, rank 1 the most frequent.
            Some(z) => (z.sample(rng) as usize).clamp(1, self.names.len()) - 1,
            None => rng.random_range(0..self.names.len()),
        };
        (i as u32, &self.names[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_favours_the_first_keys_and_uniform_does_not() {
        let mut rng = rand::rng();
        let z = KeyChooser::new(100, "k", Some(1.2)).unwrap();
        let u = KeyChooser::new(100, "k", None).unwrap();
        let count = |c: &KeyChooser, rng: &mut rand::rngs::ThreadRng| {
            let mut hits = [0u32; 100];
            for _ in 0..20_000 {
                hits[c.pick(rng).0 as usize] += 1;
            }
            hits
        };
        let zh = count(&z, &mut rng);
        let uh = count(&u, &mut rng);
        assert!(zh[0] > 10 * zh[99], "{} vs {}", zh[0], zh[99]);
        assert!(uh[0] < 3 * uh[99].max(1), "{} vs {}", uh[0], uh[99]);
        assert!(uh.iter().all(|&h| h > 0));
    }
}
