//! The `Predictor` trait and the count-based predictors: last-successor and
//! PPM-style Markov with back-off; plus the accuracy-weighted mixture of two
//! predictions and the online accuracy tracker the selector uses.
//!
//! All predictors share their tables across every (device, user) stream:
//! `observe` gets the stream's own history, so what one device's user did
//! teaches what another device's user will do next.

use super::Sym;
use std::collections::HashMap;

/// A ranked prediction: symbols with probabilities, most likely first.
pub type Ranked = Vec<(Sym, f32)>;

pub trait Predictor {
    fn name(&self) -> String;
    /// Learns that `next` followed `history` (oldest first) in some stream.
    fn observe(&mut self, history: &[Sym], next: Sym);
    /// The `top` most likely next symbols after `history`.
    fn predict(&mut self, history: &[Sym], top: usize) -> Ranked;
}

/// Predicts that what followed the last resource last time follows it again.
#[derive(Debug, Default)]
pub struct LastSuccessor {
    next: HashMap<Sym, Sym>,
}

impl Predictor for LastSuccessor {
    fn name(&self) -> String {
        "last-successor".into()
    }

    fn observe(&mut self, history: &[Sym], next: Sym) {
        if let Some(&last) = history.last() {
            self.next.insert(last, next);
        }
    }

    fn predict(&mut self, history: &[Sym], top: usize) -> Ranked {
        match history.last().and_then(|l| self.next.get(l)) {
            Some(&s) if top > 0 => vec![(s, 1.0)],
            _ => Vec::new(),
        }
    }
}

/// Most successors kept per context: the tail of a long successor list
/// never reaches a top-N prediction, and capping it bounds memory.
const MAX_SUCCESSORS: usize = 12;
/// Counts in a context are halved when their total passes this, so that old
/// habits fade and a changed routine is learned within a few hundred events.
const AGE_TOTAL: u32 = 1024;

#[derive(Debug, Default, Clone)]
struct Successors {
    total: u32,
    items: Vec<(Sym, u32)>,
}

impl Successors {
    fn add(&mut self, next: Sym) {
        if let Some(item) = self.items.iter_mut().find(|(s, _)| *s == next) {
            item.1 += 1;
        } else if self.items.len() < MAX_SUCCESSORS {
            self.items.push((next, 1));
        } else if let Some(weakest) = self.items.iter_mut().min_by_key(|(_, c)| *c) {
            // Replace the weakest: a capped list must still learn new habits.
            self.total -= weakest.1;
            *weakest = (next, 1);
        }
        self.total += 1;
        if self.total > AGE_TOTAL {
            self.total = 0;
            for item in &mut self.items {
                item.1 = item.1.div_ceil(2);
                self.total += item.1;
            }
        }
    }
}

/// Order-k context model with PPM-style back-off (escape method C): the
/// longest context seen before speaks first, shorter ones fill in with the
/// probability mass it leaves. One table set of the highest order serves
/// every lower order too (`predict_order`), which is how the harness reports
/// markov-1 to markov-8 from a single model.
#[derive(Debug)]
pub struct Markov {
    order: usize,
    tables: HashMap<u64, Successors>,
    max_contexts: usize,
}

impl Markov {
    /// `max_contexts` bounds memory: past it, contexts seen once are dropped.
    pub fn new(order: usize, max_contexts: usize) -> Self {
        Self {
            order,
            tables: HashMap::new(),
            max_contexts: max_contexts.max(1024),
        }
    }

    pub fn order(&self) -> usize {
        self.order
    }

    pub fn contexts(&self) -> usize {
        self.tables.len()
    }

    /// Hash of the last `k` symbols of `history` (and k itself, so orders never
    /// collide with each other).
    fn key(history: &[Sym], k: usize) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64 ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for &s in &history[history.len() - k..] {
            h = (h ^ u64::from(s)).wrapping_mul(0x0000_0100_0000_01b3);
            h ^= h >> 29;
        }
        h
    }

    /// Prediction using contexts of at most `order` symbols (≤ the model's).
    pub fn predict_order(&self, history: &[Sym], order: usize, top: usize) -> Ranked {
        let mut probs: Vec<(Sym, f32)> = Vec::new();
        let mut escape = 1.0f32;
        let longest = order.min(self.order).min(history.len());
        for k in (0..=longest).rev() {
            let Some(s) = self.tables.get(&Self::key(history, k)) else {
                continue;
            };
            // Exclusion: successors the longer context already named do not
            // count again here, so their mass goes to new candidates.
            let fresh: Vec<(Sym, u32)> = s
                .items
                .iter()
                .filter(|(sym, _)| !probs.iter().any(|(p, _)| p == sym))
                .copied()
                .collect();
            let fresh_total: u32 = fresh.iter().map(|(_, c)| c).sum();
            if fresh_total == 0 {
                continue;
            }
            let denom = (fresh_total + fresh.len() as u32) as f32;
            for (sym, c) in fresh {
                probs.push((sym, escape * c as f32 / denom));
            }
            escape *= s.items.len() as f32 / denom;
            if probs.len() >= top && escape < 0.05 {
                break;
            }
        }
        sort_top(&mut probs, top);
        probs
    }

    fn prune(&mut self) {
        // Contexts seen once are most of a large table and the least useful.
        self.tables.retain(|_, s| s.total > 1);
        if self.tables.len() > self.max_contexts * 3 / 4 {
            self.tables.clear();
        }
    }
}

impl Predictor for Markov {
    fn name(&self) -> String {
        format!("markov-{}", self.order)
    }

    fn observe(&mut self, history: &[Sym], next: Sym) {
        for k in 0..=self.order.min(history.len()) {
            self.tables
                .entry(Self::key(history, k))
                .or_default()
                .add(next);
        }
        if self.tables.len() > self.max_contexts {
            self.prune();
        }
    }

    fn predict(&mut self, history: &[Sym], top: usize) -> Ranked {
        self.predict_order(history, self.order, top)
    }
}

/// Sorts by probability (ties by symbol, for determinism) and keeps `top`.
pub fn sort_top(probs: &mut Ranked, top: usize) {
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    probs.truncate(top);
}

/// Online accuracy: an exponential moving average of top-1 hits, so the
/// weights follow what works lately (half-life of about 35 predictions).
#[derive(Debug, Clone, Copy)]
pub struct Accuracy {
    pub ema: f32,
    pub seen: u64,
}

impl Default for Accuracy {
    fn default() -> Self {
        Self { ema: 0.0, seen: 0 }
    }
}

impl Accuracy {
    const RATE: f32 = 0.02;

    pub fn record(&mut self, hit: bool) {
        self.seen += 1;
        // Warm up with a plain mean so early figures mean something.
        let rate = Self::RATE.max(1.0 / self.seen as f32);
        self.ema += rate * ((hit as u8 as f32) - self.ema);
    }
}

/// Mixes two predictions with weights proportional to the square of their
/// recent accuracy (plus a floor, so a predictor that has never hit still
/// breaks ties). Squared, so that a predictor that is clearly worse lately
/// barely dilutes the better one's probabilities (the prefetch plan reads
/// them as confidence).
pub fn mix(a: &Ranked, wa: f32, b: &Ranked, wb: f32, top: usize) -> Ranked {
    let (wa, wb) = (wa * wa + 0.001, wb * wb + 0.001);
    let total = wa + wb;
    let mut out: Ranked = Vec::with_capacity(a.len() + b.len());
    for &(s, p) in a {
        out.push((s, p * wa / total));
    }
    for &(s, p) in b {
        match out.iter_mut().find(|(o, _)| *o == s) {
            Some(item) => item.1 += p * wb / total,
            None => out.push((s, p * wb / total)),
        }
    }
    sort_top(&mut out, top);
    out
}

/// Whether following a person's quiet sessions on one device pays off: at
/// their first event after each quiet gap, was it on the device that would
/// follow, and among the continuation predicted from the quiet session?
/// Following is worth it while hits / (tries + 1) >= 1/2: not before a
/// first hit (on the synthetic workloads, following on trust only added
/// waste), and not while misses outnumber hits. Counts halve past 32
/// tries, so a changed habit shows.
#[derive(Debug, Clone, Copy, Default)]
pub struct FollowRecord {
    hits: f32,
    tries: f32,
}

impl FollowRecord {
    pub fn record(&mut self, hit: bool) {
        if self.tries >= 32.0 {
            self.hits /= 2.0;
            self.tries /= 2.0;
        }
        self.tries += 1.0;
        if hit {
            self.hits += 1.0;
        }
    }

    pub fn worth_following(&self) -> bool {
        self.hits / (self.tries + 1.0) >= 0.5
    }
}

/// Whether `actual` is among the first `k` of `ranked`.
pub fn hit_at(ranked: &Ranked, actual: Sym, k: usize) -> bool {
    ranked.iter().take(k).any(|(s, _)| *s == actual)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn following_starts_on_a_hit_and_stops_when_misses_outnumber_hits() {
        let mut r = FollowRecord::default();
        assert!(!r.worth_following(), "no evidence");
        r.record(true);
        assert!(r.worth_following(), "1 of 1");
        r.record(false);
        assert!(!r.worth_following(), "1 of 2");
        r.record(true);
        assert!(r.worth_following(), "2 of 3");
        for _ in 0..40 {
            r.record(false);
        }
        assert!(!r.worth_following());
        // Halved counts: a changed habit is learned in tens of moves.
        for _ in 0..20 {
            r.record(true);
        }
        assert!(r.worth_following());
    }

    /// Feeds `seq` `rounds` times as one stream, then returns top-1 accuracy
    /// over the last round.
    pub(crate) fn cycle_accuracy(p: &mut dyn Predictor, seq: &[Sym], rounds: usize) -> f32 {
        let mut history: Vec<Sym> = Vec::new();
        let mut hits = 0;
        let mut scored = 0;
        for r in 0..rounds {
            for &s in seq {
                if r == rounds - 1 && !history.is_empty() {
                    scored += 1;
                    hits += hit_at(&p.predict(&history, 1), s, 1) as u32;
                }
                p.observe(&history, s);
                history.push(s);
                if history.len() > 32 {
                    history.remove(0);
                }
            }
        }
        hits as f32 / scored as f32
    }

    #[test]
    fn last_successor_learns_a_simple_cycle() {
        let mut p = LastSuccessor::default();
        assert_eq!(cycle_accuracy(&mut p, &[1, 2, 3, 4, 5], 3), 1.0);
    }

    #[test]
    fn markov_learns_a_cycle_last_successor_cannot() {
        // 1 is followed by 2 or 3 depending on what came before it: order 1
        // (and last-successor) must fail half the time, order 2 never.
        let seq = [0, 1, 2, 9, 1, 3];
        let mut m = Markov::new(2, 1 << 16);
        assert_eq!(cycle_accuracy(&mut m, &seq, 6), 1.0);
        let mut ls = LastSuccessor::default();
        assert!(cycle_accuracy(&mut ls, &seq, 6) < 0.9);
        let history = [9, 1];
        assert_eq!(m.predict_order(&history, 2, 1)[0].0, 3);
        let ranked = m.predict_order(&history, 1, 2);
        assert_eq!(
            ranked.len(),
            2,
            "order 1 sees both successors of 1: {ranked:?}"
        );
    }

    #[test]
    fn markov_backs_off_to_shorter_contexts_and_probabilities_sum_below_one() {
        let mut m = Markov::new(4, 1 << 16);
        let mut h = Vec::new();
        for s in [1, 2, 3, 1, 2, 4, 1, 2, 3] {
            m.observe(&h, s);
            h.push(s);
        }
        // Never-seen long context [7, 8, 1]: order 1 still knows 1 → 2.
        let r = m.predict(&[7, 8, 1], 3);
        assert_eq!(r[0].0, 2);
        let total: f32 = r.iter().map(|(_, p)| p).sum();
        assert!(total <= 1.0 + 1e-5, "{r:?}");
    }

    #[test]
    fn markov_adapts_when_a_habit_changes_and_stays_bounded() {
        let mut m = Markov::new(1, 1024);
        for _ in 0..2000 {
            m.observe(&[1], 2);
        }
        for _ in 0..1500 {
            m.observe(&[1], 3);
        }
        assert_eq!(m.predict(&[1], 1)[0].0, 3);
        for i in 0..10_000u32 {
            m.observe(&[i], i + 1);
        }
        assert!(m.contexts() <= 1024, "{}", m.contexts());
    }

    #[test]
    fn mix_weights_by_accuracy() {
        let a = vec![(1, 0.9), (2, 0.1)];
        let b = vec![(2, 0.9), (1, 0.1)];
        assert_eq!(mix(&a, 0.9, &b, 0.1, 2)[0].0, 1);
        assert_eq!(mix(&a, 0.1, &b, 0.9, 2)[0].0, 2);
        let mut acc = Accuracy::default();
        for _ in 0..100 {
            acc.record(true);
        }
        assert!(acc.ema > 0.99);
        for _ in 0..100 {
            acc.record(false);
        }
        assert!(acc.ema < 0.2, "{}", acc.ema);
    }
}
