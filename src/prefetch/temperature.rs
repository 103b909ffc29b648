//! Temperature: a decaying access counter per resource, and the prefetch plan
//! it drives. Hot resources get deeper prefetch (more predicted items, whole
//! files); lukewarm ones only their first chunk; cold ones none.

use super::predict::Ranked;
use super::Sym;
use std::collections::HashMap;

/// Decaying counters: each open adds 1, and the sum halves every
/// `half_life_ms` of trace (or wall-clock) time.
#[derive(Debug)]
pub struct Temperature {
    half_life_ms: u64,
    counts: HashMap<Sym, (f32, u64)>,
}

impl Temperature {
    pub fn new(half_life_ms: u64) -> Self {
        Self {
            half_life_ms: half_life_ms.max(1),
            counts: HashMap::new(),
        }
    }

    fn decayed(&self, value: f32, since: u64, now: u64) -> f32 {
        let age = now.saturating_sub(since) as f32 / self.half_life_ms as f32;
        value * 0.5f32.powf(age)
    }

    pub fn touch(&mut self, sym: Sym, now_ms: u64) {
        let current = self.heat(sym, now_ms);
        self.counts.insert(sym, (current + 1.0, now_ms));
        if self.counts.len() > 200_000 {
            // Forget what has cooled to nothing, so the map stays bounded.
            let half = self.half_life_ms;
            self.counts.retain(|_, (v, t)| {
                let age = now_ms.saturating_sub(*t) as f32 / half as f32;
                *v * 0.5f32.powf(age) > 0.05
            });
        }
    }

    pub fn heat(&self, sym: Sym, now_ms: u64) -> f32 {
        self.counts
            .get(&sym)
            .map(|&(v, t)| self.decayed(v, t, now_ms))
            .unwrap_or(0.0)
    }

    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

/// How much of a resource a prefetch brings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Only the first chunk: enough for the open and first read to be local.
    Head,
    Whole,
}

#[derive(Debug, Clone, Copy)]
pub struct PlanConfig {
    /// Most predicted items fetched after one open (for the hottest context).
    pub max_items: usize,
    /// Candidates less likely than this are not fetched at all.
    pub min_prob: f32,
    /// Heat at or above which a resource is hot (whole file, full depth):
    /// by default, opened about once within the last half-life.
    pub hot: f32,
    /// Heat below which a resource is cold (never prefetched).
    pub cold: f32,
    /// A prediction at least this likely brings the whole file even when the
    /// resource is only lukewarm: the next photo of an album being walked.
    pub confident: f32,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            max_items: 4,
            min_prob: 0.2,
            hot: 0.75,
            cold: 0.05,
            confident: 0.4,
        }
    }
}

/// Which predicted resources to fetch and how deep, given how hot the open
/// that triggered the prediction is (`context_heat`) and how hot each
/// candidate is. Pure: the harness and the daemon both use it.
pub fn plan(
    ranked: &Ranked,
    context_heat: f32,
    heat: impl Fn(Sym) -> f32,
    cfg: &PlanConfig,
) -> Vec<(Sym, Depth)> {
    // A hot context is a routine being repeated: look further down the list.
    let items = if context_heat >= cfg.hot {
        cfg.max_items
    } else {
        cfg.max_items.div_ceil(2)
    };
    ranked
        .iter()
        .filter(|(_, p)| *p >= cfg.min_prob)
        .take(items)
        .filter_map(|&(sym, p)| {
            let h = heat(sym);
            if h < cfg.cold {
                None
            } else if h >= cfg.hot || p >= cfg.confident {
                Some((sym, Depth::Whole))
            } else {
                Some((sym, Depth::Head))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heat_decays_by_half_life() {
        let mut t = Temperature::new(1000);
        t.touch(1, 0);
        t.touch(1, 0);
        assert!((t.heat(1, 0) - 2.0).abs() < 1e-5);
        assert!((t.heat(1, 1000) - 1.0).abs() < 1e-5);
        assert!((t.heat(1, 3000) - 0.25).abs() < 1e-5);
        assert_eq!(t.heat(2, 0), 0.0);
    }

    #[test]
    fn hot_gets_whole_files_and_more_items_cold_gets_none() {
        let ranked = vec![(1, 0.4), (2, 0.3), (3, 0.25), (4, 0.22), (5, 0.01)];
        let heat = |s: Sym| match s {
            1 => 3.0,
            2 => 0.3,
            3 => 0.0,
            _ => 2.0,
        };
        let cfg = PlanConfig::default();
        let hot = plan(&ranked, 2.0, heat, &cfg);
        assert_eq!(
            hot,
            vec![(1, Depth::Whole), (2, Depth::Head), (4, Depth::Whole)]
        );
        let lukewarm = plan(&ranked, 0.3, heat, &cfg);
        assert_eq!(lukewarm, vec![(1, Depth::Whole), (2, Depth::Head)]);
        // A confident prediction of a lukewarm resource brings all of it.
        let sure = plan(&vec![(2, 0.8)], 0.3, heat, &cfg);
        assert_eq!(sure, vec![(2, Depth::Whole)]);
    }
}
