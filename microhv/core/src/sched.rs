//! The scheduler policy: which vCPU runs next, and for how long.
//!
//! A weighted round robin over the runnable vCPUs. They take turns in queue
//! order; each turn lasts a slice proportional to the vCPU's weight
//! (`BASE_SLICE_NS * weight / DEFAULT_WEIGHT`, clamped to
//! [`MIN_SLICE_NS`, `MAX_SLICE_NS`]), so over a round every runnable vCPU runs
//! once and CPU time is shared in proportion to the weights.
//!
//! A vCPU is [`RunState::Runnable`], [`RunState::Blocked`] (until [`Scheduler::wake`]
//! or, if it gave one, until its `wake_at` deadline passes) or
//! [`RunState::Dead`] (after [`Scheduler::remove`]; never picked again).
//!
//! This is pure logic with no hardware access: the caller passes the time
//! (nanoseconds of system time) and does the actual switching and timer
//! programming. A typical loop:
//!
//! ```text
//! let mut current = None;
//! loop {
//!     match sched.pick_next(now(), current) {
//!         Decision::Run { vcpu, slice_ns } => { let ran = run(vcpu, slice_ns); sched.account(vcpu, ran); current = Some(vcpu); }
//!         Decision::Idle { until } => { halt_until(until); current = None; }
//!     }
//! }
//! ```
//!
//! Invariants: the run queue holds exactly the runnable vCPUs, each once;
//! the timer set holds exactly the blocked vCPUs that have a deadline.
//!
//! Cost: picking, blocking the running vCPU and waking are O(log n) in the
//! number of vCPUs (the running vCPU is at the head of the queue; deadlines
//! are kept in order), so a domain switch costs the same with 2 or 64
//! runnable domains.

use alloc::collections::{BTreeSet, VecDeque};
use alloc::vec::Vec;

/// A vCPU, named by the caller (e.g. an index into its vCPU table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VcpuId(pub usize);

/// The weight a vCPU gets unless told otherwise.
pub const DEFAULT_WEIGHT: u16 = 256;
/// The slice of a vCPU with [`DEFAULT_WEIGHT`].
pub const BASE_SLICE_NS: u64 = 10_000_000;
/// Shortest slice, whatever the weight.
pub const MIN_SLICE_NS: u64 = 1_000_000;
/// Longest slice, whatever the weight.
pub const MAX_SLICE_NS: u64 = 100_000_000;

/// Where a vCPU is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Waiting in the run queue (or running).
    Runnable,
    /// Sleeping until woken, or until system time reaches `wake_at`.
    Blocked { wake_at: Option<u64> },
    /// Removed: never picked again.
    Dead,
}

/// What the CPU should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run `vcpu` for at most `slice_ns`.
    Run { vcpu: VcpuId, slice_ns: u64 },
    /// Nothing is runnable: halt until `until` (the earliest wake-up deadline),
    /// or until an interrupt wakes someone when there is no deadline.
    Idle { until: Option<u64> },
}

/// The slice a vCPU of weight `weight` gets (weight 0 counts as 1).
pub const fn slice_for(weight: u16) -> u64 {
    let w = if weight == 0 { 1 } else { weight as u64 };
    let s = BASE_SLICE_NS * w / DEFAULT_WEIGHT as u64;
    if s < MIN_SLICE_NS {
        MIN_SLICE_NS
    } else if s > MAX_SLICE_NS {
        MAX_SLICE_NS
    } else {
        s
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    state: RunState,
    weight: u16,
    cpu_time: u64,
    /// Woken since it last ran: runs next, but only for a short slice.
    boosted: bool,
    /// Preempted by a wake-up: what was left of its slice, which is all it
    /// gets when it runs again (not a fresh slice).
    remaining: Option<u64>,
}

/// The vCPU entries, indexed by `VcpuId` (callers use small dense ids,
/// such as an index into their vCPU table): O(1) lookups.
#[derive(Debug, Default)]
struct Table(Vec<Option<Entry>>);

impl Table {
    fn get(&self, v: &VcpuId) -> Option<&Entry> {
        self.0.get(v.0).and_then(Option::as_ref)
    }
    fn get_mut(&mut self, v: &VcpuId) -> Option<&mut Entry> {
        self.0.get_mut(v.0).and_then(Option::as_mut)
    }
    fn insert(&mut self, v: VcpuId, e: Entry) {
        if self.0.len() <= v.0 {
            self.0.resize(v.0 + 1, None);
        }
        self.0[v.0] = Some(e);
    }
    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = (VcpuId, &Entry)> {
        self.0.iter().enumerate().filter_map(|(i, e)| e.as_ref().map(|e| (VcpuId(i), e)))
    }
}

/// The weighted round-robin scheduler for one physical CPU.
#[derive(Debug, Default)]
pub struct Scheduler {
    /// Every vCPU ever added (dead ones keep their CPU time).
    vcpus: Table,
    /// The runnable vCPUs in turn order; the front runs next.
    queue: VecDeque<VcpuId>,
    /// (wake_at, vCPU) of every blocked vCPU with a deadline, earliest first.
    timers: BTreeSet<(u64, VcpuId)>,
}

impl Scheduler {
    pub fn new() -> Self {
        Scheduler { vcpus: Table::default(), queue: VecDeque::new(), timers: BTreeSet::new() }
    }

    /// Adds `v` as runnable, at the back of the queue. Weight 0 is treated as 1.
    /// Adding an id that exists already (alive or dead) starts it afresh.
    pub fn add(&mut self, v: VcpuId, weight: u16) {
        self.dequeue(v);
        self.forget_timer(v);
        self.vcpus.insert(v, Entry { state: RunState::Runnable, weight: weight.max(1), cpu_time: 0, boosted: false, remaining: None });
        self.queue.push_back(v);
    }

    /// Marks `v` dead: it is never picked again. Its CPU time stays readable.
    pub fn remove(&mut self, v: VcpuId) {
        self.forget_timer(v);
        if let Some(e) = self.vcpus.get_mut(&v) {
            e.state = RunState::Dead;
            self.dequeue(v);
        }
    }

    /// Takes `v`'s deadline (if it is blocked with one) out of the timer set.
    fn forget_timer(&mut self, v: VcpuId) {
        if let Some(RunState::Blocked { wake_at: Some(t) }) = self.vcpus.get(&v).map(|e| e.state) {
            self.timers.remove(&(t, v));
        }
    }

    /// Changes the weight of `v` (0 is treated as 1); takes effect from its next slice.
    pub fn set_weight(&mut self, v: VcpuId, weight: u16) {
        if let Some(e) = self.vcpus.get_mut(&v) {
            e.weight = weight.max(1);
        }
    }

    /// The weight of `v`, if it is known.
    pub fn weight(&self, v: VcpuId) -> Option<u16> {
        self.vcpus.get(&v).map(|e| e.weight)
    }

    /// The state of `v`; `None` if it was never added.
    pub fn state(&self, v: VcpuId) -> Option<RunState> {
        self.vcpus.get(&v).map(|e| e.state)
    }

    /// Puts `v` to sleep until [`wake`](Self::wake) or until system time
    /// reaches `wake_at`. Blocking a blocked vCPU replaces its deadline; dead
    /// or unknown vCPUs are left alone.
    pub fn block(&mut self, v: VcpuId, wake_at: Option<u64>) {
        if matches!(self.state(v), None | Some(RunState::Dead)) {
            return;
        }
        self.forget_timer(v);
        if let Some(e) = self.vcpus.get_mut(&v) {
            e.state = RunState::Blocked { wake_at };
        }
        if let Some(t) = wake_at {
            self.timers.insert((t, v));
        }
        self.dequeue(v);
    }

    /// Makes a blocked `v` runnable, at the *front* of the queue: a vCPU that
    /// waited for an event or its timer runs next (a "boost", like Xen's
    /// credit scheduler), so wake-up latency does not grow with the number of
    /// busy vCPUs. The boosted run lasts at most `MIN_SLICE_NS`. No-op unless
    /// blocked.
    pub fn wake(&mut self, v: VcpuId) {
        self.forget_timer(v);
        if let Some(e) = self.vcpus.get_mut(&v) {
            if let RunState::Blocked { .. } = e.state {
                e.state = RunState::Runnable;
                e.boosted = true;
                self.queue.push_front(v);
            }
        }
    }

    /// Wakes every blocked vCPU whose wake_at <= now; returns them, earliest
    /// deadline first (ties by id), which is also their order at the front of
    /// the queue.
    pub fn wake_expired(&mut self, now: u64) -> Vec<VcpuId> {
        if self.timers.first().is_none_or(|&(t, _)| t > now) {
            return Vec::new();
        }
        let mut due: Vec<(u64, VcpuId)> = Vec::new();
        while let Some(&(t, v)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            due.push((t, v));
        }
        // Pushing to the front in reverse leaves the earliest deadline first.
        for &(_, v) in due.iter().rev() {
            self.wake(v);
        }
        due.into_iter().map(|(_, v)| v).collect()
    }

    /// Picks the next vCPU to run at `now` (calls wake_expired first). Weighted
    /// round robin: runnable vCPUs take turns in order, each for its weight's
    /// slice; `current` (the vCPU that just ran, if still runnable) goes to the
    /// back of the queue first. If none is runnable: `Idle { until: earliest wake_at }`.
    pub fn pick_next(&mut self, now: u64, current: Option<VcpuId>) -> Decision {
        self.wake_expired(now);
        if let Some(c) = current {
            if self.state(c) == Some(RunState::Runnable) {
                self.dequeue(c);
                self.queue.push_back(c);
            }
        }
        match self.queue.front() {
            Some(&vcpu) => {
                let (weight, boosted, remaining) = self.vcpus.get_mut(&vcpu).map_or((DEFAULT_WEIGHT, false, None), |e| {
                    let b = e.boosted;
                    e.boosted = false;
                    (e.weight, b, e.remaining.take())
                });
                // A boosted (just woken) vCPU jumps the queue for at most
                // MIN_SLICE_NS, so waking often cannot starve the others.
                let full = if boosted { slice_for(weight).min(MIN_SLICE_NS) } else { slice_for(weight) };
                // A vCPU that a wake-up preempted finishes its old slice only,
                // so frequent wake-ups cannot keep it at the head forever.
                let slice = remaining.map_or(full, |r| r.clamp(1, full));
                Decision::Run { vcpu, slice_ns: slice }
            }
            None => Decision::Idle { until: self.next_wakeup() },
        }
    }

    /// Records that a wake-up preempted `v` (it keeps its place at the head)
    /// with `remaining_ns` of its slice left: its next run lasts that long.
    pub fn preempted(&mut self, v: VcpuId, remaining_ns: u64) {
        if let Some(e) = self.vcpus.get_mut(&v) {
            if e.state == RunState::Runnable {
                e.remaining = Some(remaining_ns.min(e.remaining.unwrap_or(u64::MAX)));
            }
        }
    }

    /// Charges `ran_ns` of run time to `v` (saturating).
    pub fn account(&mut self, v: VcpuId, ran_ns: u64) {
        if let Some(e) = self.vcpus.get_mut(&v) {
            e.cpu_time = e.cpu_time.saturating_add(ran_ns);
        }
    }

    /// Total run time charged to `v` (0 if unknown).
    pub fn cpu_time(&self, v: VcpuId) -> u64 {
        self.vcpus.get(&v).map_or(0, |e| e.cpu_time)
    }

    pub fn runnable_count(&self) -> usize {
        self.queue.len()
    }

    /// Earliest wake_at among blocked vCPUs.
    pub fn next_wakeup(&self) -> Option<u64> {
        self.timers.first().map(|&(t, _)| t)
    }

    /// Takes `v` out of the run queue: O(1) for the head (the running vCPU)
    /// and the tail, a scan otherwise.
    fn dequeue(&mut self, v: VcpuId) {
        if self.queue.front() == Some(&v) {
            self.queue.pop_front();
        } else if self.queue.back() == Some(&v) {
            self.queue.pop_back();
        } else {
            self.queue.retain(|&q| q != v);
        }
    }

    /// Checks the internal invariant (for tests).
    #[cfg(test)]
    fn check_invariants(&self) {
        let mut queued: Vec<VcpuId> = self.queue.iter().copied().collect();
        queued.sort_unstable();
        let before = queued.len();
        queued.dedup();
        assert_eq!(before, queued.len(), "a vCPU is queued twice: {:?}", self.queue);
        let runnable: Vec<VcpuId> =
            self.vcpus.iter().filter(|(_, e)| e.state == RunState::Runnable).map(|(v, _)| v).collect();
        assert_eq!(queued, runnable, "queue and runnable set differ");
        let deadlines: BTreeSet<(u64, VcpuId)> = self
            .vcpus
            .iter()
            .filter_map(|(v, e)| match e.state {
                RunState::Blocked { wake_at: Some(t) } => Some((t, v)),
                _ => None,
            })
            .collect();
        assert_eq!(deadlines, self.timers, "timer set and blocked deadlines differ");
        assert!(self.vcpus.iter().all(|(_, e)| e.weight >= 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run_vcpu(d: Decision) -> VcpuId {
        match d {
            Decision::Run { vcpu, .. } => vcpu,
            Decision::Idle { until } => panic!("expected a vCPU to run, got Idle until {until:?}"),
        }
    }

    #[test]
    fn slices_follow_weights_and_are_clamped() {
        assert_eq!(slice_for(DEFAULT_WEIGHT), BASE_SLICE_NS);
        assert_eq!(slice_for(512), 2 * BASE_SLICE_NS);
        assert_eq!(slice_for(128), BASE_SLICE_NS / 2);
        assert_eq!(slice_for(0), MIN_SLICE_NS);
        assert_eq!(slice_for(1), MIN_SLICE_NS);
        assert_eq!(slice_for(u16::MAX), MAX_SLICE_NS);
        let mut s = Scheduler::new();
        s.add(VcpuId(0), 0);
        assert_eq!(s.weight(VcpuId(0)), Some(1));
        assert_eq!(s.pick_next(0, None), Decision::Run { vcpu: VcpuId(0), slice_ns: MIN_SLICE_NS });
        s.set_weight(VcpuId(0), 512);
        assert_eq!(s.pick_next(0, Some(VcpuId(0))), Decision::Run { vcpu: VcpuId(0), slice_ns: 20_000_000 });
    }

    /// A busy vCPU preempted again and again by a vCPU that wakes often
    /// must not get a fresh slice each time, or a third one never runs.
    #[test]
    fn frequent_wakeups_do_not_starve_a_third_vcpu() {
        let mut s = Scheduler::new();
        let (busy, waker, third) = (VcpuId(0), VcpuId(1), VcpuId(2));
        for v in [busy, waker, third] {
            s.add(v, DEFAULT_WEIGHT);
        }
        s.block(waker, None);
        let mut now = 0;
        let mut slice_end;
        let mut cur = match s.pick_next(now, None) {
            Decision::Run { vcpu, slice_ns } => {
                slice_end = now + slice_ns;
                vcpu
            }
            d => panic!("{d:?}"),
        };
        assert_eq!(cur, busy);
        let mut third_ran = false;
        for _ in 0..200 {
            // Every 1 ms the waker wakes, runs briefly and blocks again.
            now += 1_000_000;
            if now >= slice_end {
                match s.pick_next(now, Some(cur)) {
                    Decision::Run { vcpu, slice_ns } => {
                        cur = vcpu;
                        slice_end = now + slice_ns;
                    }
                    d => panic!("{d:?}"),
                }
            }
            third_ran |= cur == third;
            if cur == waker {
                continue;
            }
            s.wake(waker);
            s.preempted(cur, slice_end - now);
            let Decision::Run { vcpu, .. } = s.pick_next(now, None) else { panic!() };
            assert_eq!(vcpu, waker);
            s.block(waker, None);
            match s.pick_next(now, None) {
                Decision::Run { vcpu, slice_ns } => {
                    cur = vcpu;
                    slice_end = now + slice_ns;
                }
                d => panic!("{d:?}"),
            }
            s.check_invariants();
        }
        assert!(third_ran, "the third vCPU never ran");
    }

    #[test]
    fn empty_scheduler_idles_without_deadline() {
        let mut s = Scheduler::new();
        assert_eq!(s.pick_next(0, None), Decision::Idle { until: None });
        assert_eq!(s.runnable_count(), 0);
        assert_eq!(s.state(VcpuId(3)), None);
        assert_eq!(s.cpu_time(VcpuId(3)), 0);
    }

    #[test]
    fn blocked_vcpus_are_never_picked() {
        let mut s = Scheduler::new();
        for i in 0..3 {
            s.add(VcpuId(i), DEFAULT_WEIGHT);
        }
        s.block(VcpuId(1), None);
        let mut cur = None;
        for t in 0..20 {
            let v = run_vcpu(s.pick_next(t * 1000, cur));
            assert_ne!(v, VcpuId(1));
            cur = Some(v);
        }
        s.block(VcpuId(0), None);
        s.block(VcpuId(2), None);
        assert_eq!(s.pick_next(1_000_000, cur), Decision::Idle { until: None });
        s.wake(VcpuId(1));
        assert_eq!(run_vcpu(s.pick_next(2_000_000, cur)), VcpuId(1));
        s.check_invariants();
    }

    #[test]
    fn timer_blocked_vcpu_is_picked_once_its_deadline_passes() {
        let mut s = Scheduler::new();
        s.add(VcpuId(7), DEFAULT_WEIGHT);
        s.block(VcpuId(7), Some(5_000));
        assert_eq!(s.pick_next(4_999, None), Decision::Idle { until: Some(5_000) });
        assert_eq!(s.state(VcpuId(7)), Some(RunState::Blocked { wake_at: Some(5_000) }));
        // Just woken, so its first run is a short, boosted one.
        assert_eq!(s.pick_next(5_000, None), Decision::Run { vcpu: VcpuId(7), slice_ns: MIN_SLICE_NS });
        assert_eq!(s.state(VcpuId(7)), Some(RunState::Runnable));
        assert_eq!(s.next_wakeup(), None);
    }

    #[test]
    fn wake_expired_returns_due_vcpus_in_deadline_order() {
        let mut s = Scheduler::new();
        for i in 0..4 {
            s.add(VcpuId(i), DEFAULT_WEIGHT);
        }
        s.block(VcpuId(0), Some(300));
        s.block(VcpuId(1), Some(100));
        s.block(VcpuId(2), Some(900));
        s.block(VcpuId(3), None);
        assert_eq!(s.wake_expired(50), vec![]);
        assert_eq!(s.wake_expired(300), vec![VcpuId(1), VcpuId(0)]);
        assert_eq!(s.state(VcpuId(2)), Some(RunState::Blocked { wake_at: Some(900) }));
        assert_eq!(s.next_wakeup(), Some(900));
        // They joined the queue in deadline order.
        assert_eq!(run_vcpu(s.pick_next(300, None)), VcpuId(1));
        assert_eq!(run_vcpu(s.pick_next(300, Some(VcpuId(1)))), VcpuId(0));
        s.check_invariants();
    }

    #[test]
    fn idle_reports_the_earliest_deadline() {
        let mut s = Scheduler::new();
        for i in 0..4 {
            s.add(VcpuId(i), DEFAULT_WEIGHT);
        }
        s.block(VcpuId(0), Some(9_000));
        s.block(VcpuId(1), None);
        s.block(VcpuId(2), Some(3_000));
        s.block(VcpuId(3), Some(7_000));
        assert_eq!(s.next_wakeup(), Some(3_000));
        assert_eq!(s.pick_next(1_000, None), Decision::Idle { until: Some(3_000) });
        assert_eq!(run_vcpu(s.pick_next(3_500, None)), VcpuId(2));
        s.block(VcpuId(2), None);
        assert_eq!(s.pick_next(3_600, Some(VcpuId(2))), Decision::Idle { until: Some(7_000) });
    }

    #[test]
    fn round_robin_runs_each_vcpu_once_per_round() {
        let mut s = Scheduler::new();
        let n = 5;
        for i in 0..n {
            s.add(VcpuId(i), DEFAULT_WEIGHT + i as u16 * 100);
        }
        let mut cur = None;
        let mut order = Vec::new();
        for _ in 0..n * 4 {
            let v = run_vcpu(s.pick_next(0, cur));
            order.push(v);
            cur = Some(v);
        }
        for round in order.chunks(n) {
            let mut r = round.to_vec();
            r.sort();
            assert_eq!(r, (0..n).map(VcpuId).collect::<Vec<_>>(), "round {round:?}");
        }
        // And the order is stable from round to round.
        assert_eq!(order[..n], order[n..2 * n]);
    }

    #[test]
    fn woken_vcpu_runs_next() {
        let mut s = Scheduler::new();
        for i in 0..3 {
            s.add(VcpuId(i), DEFAULT_WEIGHT);
        }
        s.block(VcpuId(0), None);
        let v = run_vcpu(s.pick_next(0, None));
        assert_eq!(v, VcpuId(1));
        s.wake(VcpuId(0));
        assert_eq!(run_vcpu(s.pick_next(0, Some(v))), VcpuId(0));
        assert_eq!(run_vcpu(s.pick_next(0, Some(VcpuId(0)))), VcpuId(2));
        // Waking a runnable vCPU does not queue it twice.
        s.wake(VcpuId(0));
        s.check_invariants();
    }

    #[test]
    fn boosted_run_is_short() {
        let mut s = Scheduler::new();
        s.add(VcpuId(0), DEFAULT_WEIGHT);
        s.add(VcpuId(1), DEFAULT_WEIGHT);
        s.block(VcpuId(1), None);
        s.wake(VcpuId(1));
        match s.pick_next(0, Some(VcpuId(0))) {
            Decision::Run { vcpu, slice_ns } => {
                assert_eq!(vcpu, VcpuId(1));
                assert_eq!(slice_ns, MIN_SLICE_NS);
            }
            d => panic!("{d:?}"),
        }
        // The next turn is a normal one.
        match s.pick_next(0, Some(VcpuId(1))) {
            Decision::Run { slice_ns, .. } => assert_eq!(slice_ns, BASE_SLICE_NS),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn cpu_share_is_proportional_to_weight() {
        let mut s = Scheduler::new();
        let (a, b) = (VcpuId(0), VcpuId(1));
        s.add(a, 256);
        s.add(b, 512);
        let mut now = 0u64;
        let mut cur = None;
        while now < 10_000_000_000 {
            match s.pick_next(now, cur) {
                Decision::Run { vcpu, slice_ns } => {
                    s.account(vcpu, slice_ns);
                    now += slice_ns;
                    cur = Some(vcpu);
                }
                Decision::Idle { .. } => unreachable!(),
            }
        }
        let ratio = s.cpu_time(b) as f64 / s.cpu_time(a) as f64;
        assert!((ratio - 2.0).abs() / 2.0 < 0.05, "ratio {ratio}");
        assert_eq!(s.cpu_time(a) + s.cpu_time(b), now);
    }

    #[test]
    fn cpu_share_with_three_weights() {
        let mut s = Scheduler::new();
        let ids = [VcpuId(0), VcpuId(1), VcpuId(2)];
        s.add(ids[0], 128);
        s.add(ids[1], 256);
        s.add(ids[2], 384);
        let mut now = 0u64;
        let mut cur = None;
        while now < 20_000_000_000 {
            if let Decision::Run { vcpu, slice_ns } = s.pick_next(now, cur) {
                s.account(vcpu, slice_ns);
                now += slice_ns;
                cur = Some(vcpu);
            }
        }
        let t: Vec<f64> = ids.iter().map(|&v| s.cpu_time(v) as f64).collect();
        assert!((t[1] / t[0] - 2.0).abs() < 0.1, "{t:?}");
        assert!((t[2] / t[0] - 3.0).abs() < 0.15, "{t:?}");
    }

    #[test]
    fn removed_vcpus_are_never_picked() {
        let mut s = Scheduler::new();
        s.add(VcpuId(0), DEFAULT_WEIGHT);
        s.add(VcpuId(1), DEFAULT_WEIGHT);
        s.account(VcpuId(1), 42);
        s.remove(VcpuId(1));
        assert_eq!(s.state(VcpuId(1)), Some(RunState::Dead));
        assert_eq!(s.cpu_time(VcpuId(1)), 42);
        let mut cur = None;
        for _ in 0..10 {
            let v = run_vcpu(s.pick_next(0, cur));
            assert_eq!(v, VcpuId(0));
            cur = Some(v);
        }
        // Dead vCPUs cannot be woken, blocked back to life, or passed as current.
        s.wake(VcpuId(1));
        s.block(VcpuId(1), Some(0));
        assert_eq!(s.state(VcpuId(1)), Some(RunState::Dead));
        assert_eq!(run_vcpu(s.pick_next(1, Some(VcpuId(1)))), VcpuId(0));
        s.remove(VcpuId(0));
        assert_eq!(s.pick_next(2, Some(VcpuId(0))), Decision::Idle { until: None });
        // A blocked vCPU removed before its deadline never comes back.
        s.add(VcpuId(2), DEFAULT_WEIGHT);
        s.block(VcpuId(2), Some(10));
        s.remove(VcpuId(2));
        assert_eq!(s.pick_next(100, None), Decision::Idle { until: None });
        assert_eq!(s.next_wakeup(), None);
        s.check_invariants();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(usize, u16),
        Remove(usize),
        SetWeight(usize, u16),
        Block(usize, Option<u64>),
        Wake(usize),
        WakeExpired,
        Pick { advance: u64, keep_current: bool },
    }

    fn op() -> impl Strategy<Value = Op> {
        let id = 0usize..6;
        prop_oneof![
            (id.clone(), any::<u16>()).prop_map(|(v, w)| Op::Add(v, w)),
            id.clone().prop_map(Op::Remove),
            (id.clone(), any::<u16>()).prop_map(|(v, w)| Op::SetWeight(v, w)),
            (id.clone(), proptest::option::of(0u64..50_000_000)).prop_map(|(v, d)| Op::Block(v, d)),
            id.prop_map(Op::Wake),
            Just(Op::WakeExpired),
            (0u64..30_000_000, any::<bool>()).prop_map(|(advance, keep_current)| Op::Pick { advance, keep_current }),
        ]
    }

    proptest! {
        #[test]
        fn random_operations_keep_the_invariants(ops in proptest::collection::vec(op(), 1..200)) {
            let mut s = Scheduler::new();
            let mut now = 0u64;
            let mut current: Option<VcpuId> = None;
            for op in ops {
                match op {
                    Op::Add(v, w) => s.add(VcpuId(v), w),
                    Op::Remove(v) => s.remove(VcpuId(v)),
                    Op::SetWeight(v, w) => s.set_weight(VcpuId(v), w),
                    // Deadlines relative to now (may already be due).
                    Op::Block(v, d) => s.block(VcpuId(v), d.map(|d| now + d)),
                    Op::Wake(v) => s.wake(VcpuId(v)),
                    Op::WakeExpired => {
                        for v in s.wake_expired(now) {
                            prop_assert_eq!(s.state(v), Some(RunState::Runnable));
                        }
                    }
                    Op::Pick { advance, keep_current } => {
                        now += advance;
                        let cur = if keep_current { current } else { None };
                        match s.pick_next(now, cur) {
                            Decision::Run { vcpu, slice_ns } => {
                                prop_assert_eq!(s.state(vcpu), Some(RunState::Runnable));
                                prop_assert!((MIN_SLICE_NS..=MAX_SLICE_NS).contains(&slice_ns));
                                prop_assert!(s.runnable_count() >= 1);
                                s.account(vcpu, slice_ns);
                                current = Some(vcpu);
                            }
                            Decision::Idle { until } => {
                                prop_assert_eq!(s.runnable_count(), 0);
                                prop_assert_eq!(until, s.next_wakeup());
                                if let Some(t) = until {
                                    prop_assert!(t > now, "an expired deadline was left blocked");
                                }
                                current = None;
                            }
                        }
                        // Nothing due is left sleeping after a pick.
                        if let Some(t) = s.next_wakeup() {
                            prop_assert!(t > now);
                        }
                    }
                }
                s.check_invariants();
                let runnable = (0..6).filter(|&i| s.state(VcpuId(i)) == Some(RunState::Runnable)).count();
                prop_assert_eq!(runnable, s.runnable_count());
            }
        }
    }
}
