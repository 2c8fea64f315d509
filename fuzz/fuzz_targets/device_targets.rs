//! A stream request's `$target` on the device: `device_proxy::targets`,
//! which must only ever pick a target the operator exposed, whatever a
//! service asks for (PROTOCOL.md: the device decides, not the service).
//!
//! Input layout: lines (`\n`); the first is the requested target as it
//! arrives in `$target`, the others are the operator's exposed targets
//! (`HOST:PORT`; lines that do not parse are skipped). Checked: no panic;
//! a selected target is one of the exposed ones, and the one asked for (the
//! first exposed on that port for `PORT`; the same port and host, up to
//! ASCII case, for `HOST:PORT`); a request is refused as not exposed only
//! when no exposed target matches; a target prints as text that parses
//! back to it (but see the exception below).
#![no_main]

use device_proxy::targets::{ExposedTargets, Target, TargetRefusal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let requested = lines.next().unwrap_or_default();
    let exposed: Vec<Target> = lines.filter_map(|line| Target::parse(line).ok()).collect();
    for target in exposed.iter().chain(Target::parse(requested).as_ref().ok()) {
        assert!(!target.host.is_empty() && target.port != 0);
        // Every accepted target prints as text that parses back to it (hosts
        // with white space, once accepted inside brackets, are refused now).
        let printed = target.to_string();
        assert_eq!(
            Target::parse(&printed).as_ref(),
            Ok(target),
            "{target:?} prints as {printed:?}"
        );
    }
    let Some((default, allowed)) = exposed.split_first() else {
        return;
    };
    let targets = ExposedTargets::new(default.clone(), allowed.iter().cloned());
    let _ = targets.to_string();
    assert_eq!(targets.select(None), Ok(default));

    let same = |a: &Target, b: &Target| a.port == b.port && a.host.eq_ignore_ascii_case(&b.host);
    let by_port = (!requested.is_empty() && requested.bytes().all(|byte| byte.is_ascii_digit()))
        .then(|| requested.parse::<u16>().ok().filter(|&port| port != 0));
    let wanted = Target::parse(requested).ok();
    match targets.select(Some(requested)) {
        Ok(selected) => {
            assert!(
                exposed.iter().any(|target| same(target, selected)),
                "{selected:?} is not exposed"
            );
            match (by_port, &wanted) {
                (Some(Some(port)), _) => assert_eq!(
                    Some(selected),
                    exposed.iter().find(|target| target.port == port)
                ),
                (None, Some(wanted)) => assert!(
                    same(selected, wanted),
                    "asked for {wanted:?}, got {selected:?}"
                ),
                _ => panic!("{requested:?} is malformed but selected {selected:?}"),
            }
        }
        Err(TargetRefusal::NotExposed { .. }) => match (by_port, &wanted) {
            (Some(Some(port)), _) => assert!(exposed.iter().all(|target| target.port != port)),
            (None, Some(wanted)) => assert!(exposed.iter().all(|target| !same(target, wanted))),
            _ => panic!("{requested:?} is malformed but refused as not exposed"),
        },
        Err(TargetRefusal::Malformed { .. }) => {
            assert!(matches!(by_port, Some(None)) || (by_port.is_none() && wanted.is_none()))
        }
    }
});
