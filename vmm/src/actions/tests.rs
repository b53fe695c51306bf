//! The actions on a real mapper and a real region file, without a VM: what the API's handlers call.

use std::sync::Arc;

use daxvisor_mapper::{LeaseMode, Mapper};

use super::*;
use crate::events::EventKind;
use crate::region_registry::test_region;

const SIZE: u64 = 2 << 20;

struct Rig {
    actions: Arc<Actions>,
    events: Arc<EventLog>,
    _dir: tempfile::TempDir,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let events = Arc::new(EventLog::default());
    let regions = RegionRegistry::new();
    let notifier = crate::lease_manager::RecordingNotifier::new(
        Arc::new(crate::lease_manager::LogNotifier),
        events.clone(),
        regions.clone(),
    );
    let mapper = Mapper::new(Arc::new(notifier), None);
    regions.insert(test_region(&mapper, dir.path(), "scratch", SIZE));
    let reclaim =
        crate::reclaim::Reclaim::start(mapper.clone(), events.clone(), regions.clone()).unwrap();
    let actions = Actions::new(
        mapper,
        regions,
        events.clone(),
        reclaim,
        RunState::new().unwrap(),
    );
    Rig {
        actions,
        events,
        _dir: dir,
    }
}

fn kinds(events: &EventLog) -> Vec<EventKind> {
    events.since(0).iter().map(|e| e.kind).collect()
}

#[test]
fn bad_names_and_ranges_are_refused_before_the_mapper_and_change_nothing() {
    let r = rig();
    let punch = |region: &str, offset, length| Change {
        kind: ChangeKind::Punch,
        region: region.into(),
        offset,
        length,
        deadline_ms: None,
        policy: Policy::Fail,
    };
    let e = r.actions.change(punch("nope", 0, 0)).unwrap_err();
    assert!(matches!(e, ActionError::NoRegion { .. }), "{e}");
    assert_eq!(e.to_string(), "no region 'nope' (regions: scratch)");
    let e = r.actions.change(punch("scratch", SIZE, 0)).unwrap_err();
    assert!(matches!(e, ActionError::OutOfRange(_)), "{e}");
    let e = r
        .actions
        .acquire_lease("scratch", 4096, SIZE, LeaseMode::Shared)
        .unwrap_err();
    assert!(matches!(e, ActionError::OutOfRange(_)), "{e}");
    assert!(matches!(
        r.actions.release_lease(12345),
        Err(ActionError::NoLease(12345))
    ));
    assert!(kinds(&r.events).is_empty(), "{:?}", kinds(&r.events));
    assert!(r.actions.mapper.snapshot().leases().is_empty());
}

#[test]
fn a_break_reports_its_progress_from_the_mapper_and_its_result_from_the_report() {
    let r = rig();
    // Another owner (an application) holds the region shared; it releases 50 ms into the break, on another
    // thread. (The operator's own shared lease would not be broken for its own change.)
    let mapper = r.actions.mapper.clone();
    let app = mapper.add_owner("app");
    let region = r.actions.region("scratch").unwrap().id;
    let lease = mapper
        .acquire(app, region, 0, 0, LeaseMode::Shared)
        .unwrap();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        mapper.release(app, lease).unwrap();
    });
    let out = r
        .actions
        .change(Change {
            kind: ChangeKind::Break,
            region: "scratch".into(),
            offset: 0,
            length: 1 << 20,
            deadline_ms: Some(10_000),
            policy: Policy::Fail,
        })
        .unwrap();
    releaser.join().unwrap();
    assert_eq!(out.holders.len(), 1, "{out:?}");
    let h = &out.holders[0];
    assert_eq!((h.name.as_str(), h.revoked), ("app", false));
    assert!(h.released_after_ms.is_some(), "{out:?}");
    let k = kinds(&r.events);
    let at = |want| {
        k.iter()
            .position(|x| *x == want)
            .unwrap_or_else(|| panic!("no {want}: {k:?}"))
    };
    assert!(at(EventKind::ChangeStarted) < at(EventKind::BreakStarted));
    assert!(at(EventKind::BreakStarted) < at(EventKind::HolderReleased));
    assert!(at(EventKind::HolderReleased) < at(EventKind::ChangeDone));
}

#[test]
fn stop_is_asked_once() {
    let r = rig();
    assert!(r.actions.stop());
    assert!(!r.actions.stop());
    assert!(r.actions.stopping());
    assert_eq!(kinds(&r.events), [EventKind::StopRequested]);
}

#[test]
fn the_operators_own_leases_never_make_its_change_wait_on_itself() {
    let r = rig();
    let punch = |region: &str, offset, length| Change {
        kind: ChangeKind::Punch,
        region: region.into(),
        offset,
        length,
        deadline_ms: Some(60_000),
        policy: Policy::Fail,
    };
    // Its shared lease is not broken for its own change, and stays.
    r.actions
        .acquire_lease("scratch", 0, 1 << 20, LeaseMode::Shared)
        .unwrap();
    let out = r.actions.change(punch("scratch", 0, 4096)).unwrap();
    assert!(out.holders.is_empty(), "{out:?}");
    assert_eq!(r.actions.mapper.snapshot().leases().len(), 1);
    // Its exclusive lease makes its own change EDEADLK (someone else's would be ETXTBSY).
    r.actions
        .acquire_lease("scratch", 1 << 20, 1 << 20, LeaseMode::Exclusive)
        .unwrap();
    let e = r
        .actions
        .change(punch("scratch", 1 << 20, 4096))
        .unwrap_err();
    assert!(
        matches!(
            e,
            ActionError::Refused(daxvisor_mapper::MapperError::Deadlock { .. })
        ),
        "{e}"
    );
}
