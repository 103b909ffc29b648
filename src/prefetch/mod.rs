//! Predictive prefetching: what people open, what they will open next, and
//! what to fetch ahead of them.
//!
//! This module owns the pure side of prediction, apart from I/O:
//! - `trace`: the access-trace format of the command-line contract (JSON lines);
//! - `predict`: the `Predictor` trait and the count-based predictors
//!   (last-successor, PPM-style Markov with back-off), the accuracy-weighted
//!   mixture and the per-stream selector;
//! - `rnn`: the GRU (the only file importing tch);
//! - `temperature`: decaying access counters and the prefetch plan they drive;
//! - `eval`: the replay harness behind `meshfs prefetch-eval`;
//! - `workload`: synthetic cross-device trace generators;
//! - `log`: access events as the daemon records and shares them;
//! - `engine`: the daemon's prediction thread (observe, train, predict).
//!
//! Predictors see resources as dense symbols (`Sym`): the harness interns
//! trace paths, the daemon interns resource ids, so the same code serves both.

pub mod engine;
pub mod eval;
pub mod fetch;
pub mod log;

pub mod predict;
pub mod rnn;
pub mod temperature;
pub mod trace;
pub mod workload;

/// A resource as predictors see it: a dense index assigned on first sight.
pub type Sym = u32;

/// Interns keys (trace paths, resource ids) as dense symbols.
#[derive(Debug, Default)]
pub struct Interner<K: std::hash::Hash + Eq + Clone> {
    ids: std::collections::HashMap<K, Sym>,
    keys: Vec<K>,
}

impl<K: std::hash::Hash + Eq + Clone> Interner<K> {
    pub fn new() -> Self {
        Self {
            ids: std::collections::HashMap::new(),
            keys: Vec::new(),
        }
    }

    pub fn intern(&mut self, key: &K) -> Sym {
        if let Some(&s) = self.ids.get(key) {
            return s;
        }
        let s = self.keys.len() as Sym;
        self.keys.push(key.clone());
        self.ids.insert(key.clone(), s);
        s
    }

    pub fn get(&self, key: &K) -> Option<Sym> {
        self.ids.get(key).copied()
    }

    pub fn key(&self, sym: Sym) -> Option<&K> {
        self.keys.get(sym as usize)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A small deterministic generator (SplitMix64) for sampling training windows
/// and synthetic workloads: reproducible from a seed, no dependency.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        self.next_u64() % n
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability p.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}
