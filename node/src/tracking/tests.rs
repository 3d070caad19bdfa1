use alloy::primitives::Address;

use super::*;
use crate::store::tables::AuditLog;

fn open(dir: &std::path::Path) -> (Store, Tracking) {
    let store = Store::open(&dir.join("db")).unwrap();
    let tracking = Tracking::open(store.clone(), Audit::new(store.clone())).unwrap();
    (store, tracking)
}

fn op() -> Context {
    Context::operator()
}

fn wallet(n: u8) -> Context {
    Context { actor: Actor::Wallet(Address::repeat_byte(n)), request_id: None }
}

fn point(value: f64, step: i64, timestamp: i64) -> MetricValue {
    MetricValue { value, step, timestamp }
}

fn metrics(points: &[(&str, MetricValue)]) -> Logs {
    Logs { metrics: points.iter().map(|(k, m)| (k.to_string(), *m)).collect(), ..Logs::default() }
}

fn params(pairs: &[(&str, &str)]) -> Logs {
    Logs { params: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), ..Logs::default() }
}

fn forbidden<T: std::fmt::Debug>(result: Result<T, RegistryError>) {
    assert!(matches!(result, Err(RegistryError::Forbidden(_))), "{result:?}");
}

fn refused<T: std::fmt::Debug>(result: Result<T, RegistryError>, says: &str) {
    match result {
        Err(RegistryError::Invalid(m)) => assert!(m.contains(says), "{m}"),
        other => panic!("expected a refusal saying '{says}', got {other:?}"),
    }
}

#[test]
fn the_default_experiment_exists_once_and_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (store, tracking) = open(dir.path());
    let default = tracking.experiment(DEFAULT_EXPERIMENT).unwrap();
    assert_eq!(
        (default.name.as_str(), default.artifact_location.as_str()),
        ("Default", "mlflow-artifacts:/0")
    );
    refused(tracking.set_experiment_deleted(&op(), DEFAULT_EXPERIMENT, true), "cannot be deleted");
    refused(tracking.rename_experiment(&op(), DEFAULT_EXPERIMENT, "other"), "keeps its name");
    let id = tracking.create_experiment(&op(), "first", None, vec![]).unwrap();
    assert_eq!(id, 1);
    drop((store, tracking));
    let (_store, tracking) = open(dir.path());
    assert_eq!(tracking.experiment(DEFAULT_EXPERIMENT).unwrap(), default, "reopening keeps it as it was");
    assert_eq!(tracking.create_experiment(&op(), "second", None, vec![]).unwrap(), 2, "ids are not reused");
}

#[test]
fn experiments_and_runs_belong_to_their_creators() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, tracking) = open(dir.path());
    let (a, b) = (wallet(0xaa), wallet(0xbb));
    let mine = tracking.create_experiment(&a, "a's", None, vec![("team".into(), "risk".into())]).unwrap();
    assert_eq!(tracking.experiment(mine).unwrap().owner, Some(Address::repeat_byte(0xaa)));
    forbidden(tracking.rename_experiment(&b, mine, "b's now"));
    forbidden(tracking.set_experiment_tag(&b, mine, "team", Some("ops")));
    forbidden(tracking.set_experiment_deleted(&b, mine, true));
    forbidden(tracking.create_run(&b, mine, NewRun::default()));
    assert_eq!(tracking.experiment(mine).unwrap().tags["team"], "risk", "nothing changed");
    // the operator's experiments (Default among them) take anyone's runs
    let theirs = tracking.create_run(&b, DEFAULT_EXPERIMENT, NewRun::default()).unwrap();
    assert_eq!(theirs.user_id, Address::repeat_byte(0xbb).to_checksum(None));
    forbidden(tracking.log(&a, &theirs.run_id(), params(&[("lr", "1")])));
    forbidden(tracking.update_run(&a, &theirs.run_id(), Some(RunStatus::Killed), None, None));
    forbidden(tracking.set_run_deleted(&a, &theirs.run_id(), true));
    tracking.log(&op(), &theirs.run_id(), params(&[("lr", "1")])).unwrap();
    tracking.log(&b, &theirs.run_id(), params(&[("epochs", "3")])).unwrap();
    let run = tracking.run(&theirs.run_id()).unwrap();
    assert_eq!(run.params.len(), 2);
    assert_eq!(run.status, RunStatus::Running);
    let anonymous = Context { actor: Actor::Anonymous, request_id: None };
    assert!(matches!(
        tracking.create_run(&anonymous, DEFAULT_EXPERIMENT, NewRun::default()),
        Err(RegistryError::Unauthenticated(_))
    ));
    // a run's artifact directory is its creator's
    let path = format!("0/{}/artifacts/model.bin", theirs.run_id());
    tracking.check_artifact_write(&b, &path).unwrap();
    tracking.check_artifact_write(&op(), &path).unwrap();
    forbidden(tracking.check_artifact_write(&a, &path));
    // paths that are no run's are left to the registry
    tracking.check_artifact_write(&a, &format!("1/{}/x", theirs.run_id())).unwrap();
    tracking.check_artifact_write(&a, "0/notarun/x").unwrap();
    tracking.check_artifact_write(&a, "scratch/file").unwrap();
}

#[test]
fn params_are_written_once_and_a_bad_batch_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, tracking) = open(dir.path());
    let run = tracking.create_run(&op(), DEFAULT_EXPERIMENT, NewRun::default()).unwrap();
    let id = run.run_id();
    tracking.log(&op(), &id, params(&[("lr", "0.1")])).unwrap();
    tracking.log(&op(), &id, params(&[("lr", "0.1")])).unwrap();
    refused(tracking.log(&op(), &id, params(&[("lr", "0.2")])), "Changing param values is not allowed");
    refused(tracking.log(&op(), &id, params(&[("a", "1"), ("a", "2")])), "Changing param values");
    let before = tracking.run(&id).unwrap();
    let points_before = store.iter::<TrackingMetrics>().count();
    // a good metric and tag beside a bad key: none of it is kept
    let batch = Logs {
        metrics: vec![("loss".into(), point(1.0, 0, 1))],
        params: vec![("ok".into(), "1".into())],
        tags: vec![("bad\nkey".into(), "x".into())],
        ..Logs::default()
    };
    refused(tracking.log(&op(), &id, batch), "bad\nkey");
    let batch = Logs {
        metrics: vec![("loss".into(), point(1.0, 0, 1))],
        params: vec![("lr".into(), "9".into())],
        ..Logs::default()
    };
    refused(tracking.log(&op(), &id, batch), "Changing param values");
    refused(tracking.log(&op(), &id, params(&[("../escape", "1")])), "'..'");
    refused(tracking.log(&op(), &id, params(&[("long", &"x".repeat(MAX_PARAM_VALUE + 1))])), "longer than");
    let too_many = Logs {
        params: (0..=MAX_BATCH_PARAMS).map(|i| (format!("p{i}"), "1".into())).collect(),
        ..Logs::default()
    };
    refused(tracking.log(&op(), &id, too_many), "at most");
    assert_eq!(tracking.run(&id).unwrap(), before);
    assert_eq!(store.iter::<TrackingMetrics>().count(), points_before);
    // a deleted run takes nothing until restored
    tracking.set_run_deleted(&op(), &id, true).unwrap();
    refused(tracking.log(&op(), &id, params(&[("late", "1")])), "'active' state");
    tracking.set_run_deleted(&op(), &id, false).unwrap();
    tracking.log(&op(), &id, params(&[("late", "1")])).unwrap();
    // the lifecycle changes are in the audit log, the params are not
    let actions: Vec<String> = store.iter::<AuditLog>().map(|e| e.unwrap().1.action).collect();
    assert_eq!(actions.len(), 3, "{actions:?}");
    assert!(actions[0].starts_with("tracking.run_created"), "{actions:?}");
    assert!(
        actions[1].starts_with("tracking.run_deleted") && actions[2].starts_with("tracking.run_restored")
    );
}

#[test]
fn metrics_keep_every_point_and_the_latest_by_step_then_time() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, tracking) = open(dir.path());
    let run = tracking.create_run(&op(), DEFAULT_EXPERIMENT, NewRun::default()).unwrap();
    let id = run.run_id();
    let logged = [
        ("loss", point(0.9, 0, 100)),
        ("loss", point(0.5, 2, 50)),
        ("loss", point(0.7, 1, 300)),
        ("loss", point(0.4, 2, 60)),
        ("acc", point(f64::NAN, 0, 1)),
        ("los", point(3.0, 9, 9)),
    ];
    for chunk in logged.chunks(2) {
        tracking.log(&op(), &id, metrics(chunk)).unwrap();
    }
    let run = tracking.run(&id).unwrap();
    assert_eq!(run.latest["loss"], point(0.4, 2, 60), "step 2 at the later time");
    assert!(run.latest["acc"].value.is_nan());
    assert_eq!(run.points, 6);
    let (all, next) = tracking.metric_history(&id, "loss", 0, usize::MAX).unwrap();
    assert_eq!(all, logged[..4].iter().map(|(_, m)| *m).collect::<Vec<_>>(), "in the order logged");
    assert_eq!(next, None);
    // pages of two; `los` is a prefix of `loss` but a series of its own
    let (first, next) = tracking.metric_history(&id, "loss", 0, 2).unwrap();
    assert_eq!(first, all[..2]);
    let (second, last) = tracking.metric_history(&id, "loss", next.unwrap(), 2).unwrap();
    assert_eq!(second, all[2..]);
    assert_eq!(last, None);
    assert_eq!(tracking.metric_history(&id, "los", 0, 10).unwrap().0, vec![point(3.0, 9, 9)]);
    assert!(tracking.metric_history(&id, "missing", 0, 10).unwrap().0.is_empty());
    assert!(matches!(tracking.metric_history("0123", "loss", 0, 1), Err(RegistryError::NotFound(_))));
}

#[test]
fn runs_are_found_by_metrics_params_tags_and_attributes() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, tracking) = open(dir.path());
    let exp = tracking.create_experiment(&op(), "search", None, vec![]).unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let new = NewRun { name: Some(format!("r{i}")), start_ms: Some(1000 + i), tags: vec![] };
        let run = tracking.create_run(&op(), exp, new).unwrap();
        let logs = Logs {
            metrics: if i == 4 { vec![] } else { vec![("acc".into(), point(i as f64 / 10.0, 0, 0))] },
            params: vec![("i".into(), i.to_string())],
            tags: vec![("parity".into(), if i % 2 == 0 { "even" } else { "odd" }.into())],
            ..Logs::default()
        };
        tracking.log(&op(), &run.run_id(), logs).unwrap();
        ids.push(run.run_id());
    }
    let names = |filter: &str, order: &[&str]| -> Vec<String> {
        let clauses = filter::parse(filter, Kind::Runs).unwrap_or_else(|e| panic!("{filter}: {e}"));
        let order = parse_order(order, Kind::Runs).unwrap();
        tracking
            .search_runs(&[exp], ViewType::ActiveOnly, &clauses, &order)
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect()
    };
    assert_eq!(names("", &[]), ["r4", "r3", "r2", "r1", "r0"], "the latest started first");
    assert_eq!(names("metrics.acc >= 0.1 AND tags.parity = 'odd'", &[]), ["r3", "r1"]);
    assert_eq!(names("metrics.acc > 1e-1", &["metrics.acc ASC"]), ["r2", "r3"]);
    assert_eq!(names("params.i = '3'", &[]), ["r3"]);
    assert_eq!(names("attributes.run_name LIKE 'r%' AND start_time < 1002", &["run_name"]), ["r0", "r1"]);
    assert_eq!(
        names("status = 'RUNNING' and params.`i` != '0'", &["params.i DESC"]),
        ["r4", "r3", "r2", "r1"]
    );
    // a run without the metric is not compared, and sorts last either way
    assert_eq!(names("metrics.acc != 0.3", &[]), ["r2", "r1", "r0"]);
    assert_eq!(names("", &["metrics.acc DESC"]), ["r3", "r2", "r1", "r0", "r4"]);
    let in_list = format!("run_id IN ('{}', '{}')", ids[1], ids[2]);
    assert_eq!(names(&in_list, &[]), ["r2", "r1"]);
    for (bad, says) in [
        ("metrics.acc > 'high'", "takes a number"),
        ("params.i > 3", "not supported"),
        ("colour = 'red'", "invalid filter field"),
        ("metrics. = 1", "needs a key"),
    ] {
        let err = filter::parse(bad, Kind::Runs).unwrap_err();
        assert!(err.contains(says), "{bad}: {err}");
    }
    assert!(parse_order(&["shoe_size DESC"], Kind::Runs).is_err());
    // deleted runs show only when asked for
    tracking.set_run_deleted(&op(), &ids[0], true).unwrap();
    let deleted = tracking.search_runs(&[exp], ViewType::DeletedOnly, &[], &[]).unwrap();
    assert_eq!(deleted.iter().map(|r| r.run_id()).collect::<Vec<_>>(), [ids[0].clone()]);
    assert_eq!(tracking.search_runs(&[exp], ViewType::All, &[], &[]).unwrap().len(), 5);
    assert!(matches!(tracking.search_runs(&[99], ViewType::All, &[], &[]), Err(RegistryError::NotFound(_))));
}

#[test]
fn experiment_names_stay_unique_through_renames_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, tracking) = open(dir.path());
    let a = tracking.create_experiment(&op(), "a", None, vec![]).unwrap();
    let b = tracking.create_experiment(&op(), "b", Some("s3://bucket/b"), vec![]).unwrap();
    assert_eq!(tracking.experiment(b).unwrap().artifact_location, "s3://bucket/b");
    let run = tracking.create_run(&op(), b, NewRun::default()).unwrap();
    assert_eq!(run.artifact_uri, format!("s3://bucket/b/{}/artifacts", run.run_id()));
    assert!(matches!(
        tracking.create_experiment(&op(), "a", None, vec![]),
        Err(RegistryError::AlreadyExists(_))
    ));
    assert!(matches!(tracking.rename_experiment(&op(), b, "a"), Err(RegistryError::AlreadyExists(_))));
    tracking.rename_experiment(&op(), a, "c").unwrap();
    assert_eq!(tracking.experiment_by_name("c").unwrap().id, a);
    assert!(matches!(tracking.experiment_by_name("a"), Err(RegistryError::NotFound(_))));
    tracking.create_experiment(&op(), "a", None, vec![]).unwrap();
    tracking.set_experiment_deleted(&op(), a, true).unwrap();
    match tracking.create_experiment(&op(), "c", None, vec![]) {
        Err(RegistryError::AlreadyExists(m)) => assert!(m.contains("deleted state"), "{m}"),
        other => panic!("{other:?}"),
    }
    refused(tracking.create_run(&op(), a, NewRun::default()), "deleted");
    // its runs went with it, and come back with it
    let runs_of = |view| tracking.search_runs(&[a], view, &[], &[]).unwrap().len();
    assert_eq!((runs_of(ViewType::ActiveOnly), runs_of(ViewType::DeletedOnly)), (0, 0), "a has no runs yet");
    assert_eq!(tracking.search_runs(&[b], ViewType::ActiveOnly, &[], &[]).unwrap().len(), 1);
    tracking.set_experiment_deleted(&op(), b, true).unwrap();
    assert_eq!(tracking.search_runs(&[b], ViewType::ActiveOnly, &[], &[]).unwrap().len(), 0);
    assert!(tracking.run(&run.run_id()).unwrap().deleted);
    tracking.set_experiment_deleted(&op(), b, false).unwrap();
    assert!(!tracking.run(&run.run_id()).unwrap().deleted);
    let active = |view| -> Vec<String> {
        tracking
            .search_experiments(view, &[], &parse_order(&["name"], Kind::Experiments).unwrap())
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect()
    };
    assert_eq!(active(ViewType::ActiveOnly), ["Default", "a", "b"]);
    assert_eq!(active(ViewType::DeletedOnly), ["c"]);
    tracking.set_experiment_deleted(&op(), a, false).unwrap();
    tracking.create_run(&op(), a, NewRun::default()).unwrap();
    refused(tracking.create_experiment(&op(), " ", None, vec![]), "needs a name");
}

#[test]
fn logged_models_belong_to_their_creators_and_hide_once_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, tracking) = open(dir.path());
    let (a, b) = (wallet(0xaa), wallet(0xbb));
    let run = tracking.create_run(&a, DEFAULT_EXPERIMENT, NewRun::default()).unwrap();
    let new = NewLoggedModel {
        name: Some("clf".into()),
        source_run_id: Some(run.run_id()),
        params: vec![("depth".into(), "3".into())],
        ..NewLoggedModel::default()
    };
    let model = tracking.create_logged_model(&a, DEFAULT_EXPERIMENT, new).unwrap();
    let id = model.model_id();
    assert_eq!(model.status, ModelStatus::Pending);
    assert_eq!(model.artifact_location, format!("mlflow-artifacts:/0/models/{id}/artifacts"));
    let missing_run = NewLoggedModel { source_run_id: Some("f".repeat(32)), ..NewLoggedModel::default() };
    assert!(matches!(
        tracking.create_logged_model(&a, DEFAULT_EXPERIMENT, missing_run),
        Err(RegistryError::NotFound(_))
    ));

    forbidden(tracking.finalize_logged_model(&b, &id, ModelStatus::Ready));
    forbidden(tracking.change_logged_model_metadata(&b, &id, vec![], vec![("k".into(), "v".into())], None));
    forbidden(tracking.check_artifact_write(&b, &format!("0/models/{id}/artifacts/MLmodel")));
    tracking.check_artifact_write(&a, &format!("0/models/{id}/artifacts/MLmodel")).unwrap();
    refused(
        tracking.change_logged_model_metadata(&a, &id, vec![("depth".into(), "4".into())], vec![], None),
        "Changing param values",
    );
    assert_eq!(
        tracking.finalize_logged_model(&a, &id, ModelStatus::Ready).unwrap().status,
        ModelStatus::Ready
    );

    tracking.log_outputs(&a, &run.run_id(), vec![(id.clone(), 3), (id.clone(), 5)]).unwrap();
    assert_eq!(
        tracking.run(&run.run_id()).unwrap().outputs,
        vec![(model.id, 5)],
        "a model once, at its last step"
    );
    assert!(matches!(
        tracking.log_outputs(&a, &run.run_id(), vec![("m-nothing".into(), 0)]),
        Err(RegistryError::NotFound(_))
    ));

    let clauses =
        filter::parse(&format!("name = 'clf' AND source_run_id = '{}'", run.run_id()), Kind::LoggedModels)
            .unwrap();
    let found = tracking.search_logged_models(&[DEFAULT_EXPERIMENT], &clauses, &[]).unwrap();
    assert_eq!(found.iter().map(|m| m.model_id()).collect::<Vec<_>>(), std::slice::from_ref(&id));
    forbidden(tracking.delete_logged_model(&b, &id));
    tracking.delete_logged_model(&a, &id).unwrap();
    refused(tracking.check_artifact_write(&a, &format!("0/models/{id}/artifacts/MLmodel")), "is deleted");
    tracking.set_run_deleted(&a, &run.run_id(), true).unwrap();
    let file = format!("0/{}/artifacts/plot.png", run.run_id());
    refused(tracking.check_artifact_write(&a, &file), "must be in the 'active' state");
    tracking.set_run_deleted(&a, &run.run_id(), false).unwrap();
    tracking.check_artifact_write(&a, &file).unwrap();
    assert!(matches!(tracking.logged_model(&id, false), Err(RegistryError::NotFound(_))));
    assert!(tracking.logged_model(&id, true).unwrap().deleted);
    assert!(tracking.search_logged_models(&[DEFAULT_EXPERIMENT], &[], &[]).unwrap().is_empty());
}

#[test]
fn a_logged_models_metrics_come_with_its_runs_and_rank_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, tracking) = open(dir.path());
    let run = tracking.create_run(&op(), DEFAULT_EXPERIMENT, NewRun::default()).unwrap();
    let model = |name: &str| {
        let new = NewLoggedModel { name: Some(name.into()), ..NewLoggedModel::default() };
        tracking.create_logged_model(&op(), DEFAULT_EXPERIMENT, new).unwrap().model_id()
    };
    let (small, large) = (model("small"), model("large"));
    let log = |id: &str, acc: f64, step: i64| Logs {
        metrics: vec![("acc".into(), point(acc, step, 1))],
        model_metrics: vec![(id.to_owned(), "acc".into(), point(acc, step, 1))],
        ..Logs::default()
    };
    tracking.log(&op(), &run.run_id(), log(&small, 0.80, 1)).unwrap();
    tracking.log(&op(), &run.run_id(), log(&large, 0.70, 1)).unwrap();
    tracking.log(&op(), &run.run_id(), log(&large, 0.93, 2)).unwrap();
    tracking.log(&op(), &run.run_id(), log(&large, 0.50, 0)).unwrap();
    let got = tracking.logged_model(&large, false).unwrap();
    assert_eq!(got.metrics["acc"], (point(0.93, 2, 1), run.run_id()), "the latest step's");
    let order = parse_order(&["metrics.acc DESC"], Kind::LoggedModels).unwrap();
    let ranked = tracking.search_logged_models(&[DEFAULT_EXPERIMENT], &[], &order).unwrap();
    assert_eq!(ranked.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["large", "small"]);
    let clauses = filter::parse("metrics.acc < 0.9", Kind::LoggedModels).unwrap();
    let found = tracking.search_logged_models(&[DEFAULT_EXPERIMENT], &clauses, &[]).unwrap();
    assert_eq!(found.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["small"]);
    // an unknown model fails the whole call: the run's point is not kept either
    let points = tracking.run(&run.run_id()).unwrap().points;
    assert!(matches!(
        tracking.log(&op(), &run.run_id(), log(&format!("m-{}", "0".repeat(32)), 1.0, 9)),
        Err(RegistryError::NotFound(_))
    ));
    assert_eq!(tracking.run(&run.run_id()).unwrap().points, points);
}

/// `mlflow gc`: only what is deleted goes, with its points, artifacts and lookups; named ids
/// that may not go refuse the whole call; an age keeps what was deleted recently.
#[test]
fn collection_deletes_for_good_only_what_was_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (store, tracking) = open(dir.path());
    let a = wallet(0xaa);
    let run = |experiment| tracking.create_run(&a, experiment, NewRun::default()).unwrap().run_id();
    let model = |experiment| {
        tracking.create_logged_model(&a, experiment, NewLoggedModel::default()).unwrap().model_id()
    };
    let doomed = tracking.create_experiment(&a, "doomed", None, vec![]).unwrap();
    let kept = tracking.create_experiment(&a, "kept", None, vec![]).unwrap();
    let (r1, m1) = (run(doomed), model(doomed));
    let (r2, r3, r4, m2) = (run(kept), run(kept), run(kept), model(kept));
    for r in [&r1, &r2, &r4] {
        let points: Vec<_> = (0..25).map(|i| ("loss", point(1.0 / (i + 1) as f64, i, i))).collect();
        tracking.log(&a, r, metrics(&points)).unwrap();
    }
    tracking.log(&a, &r3, metrics(&[("loss", point(0.5, 0, 0))])).unwrap();
    tracking.set_experiment_deleted(&a, doomed, true).unwrap();
    for r in [&r2, &r4] {
        tracking.set_run_deleted(&a, r, true).unwrap();
    }
    tracking.delete_logged_model(&a, &m2).unwrap();
    // r4 was deleted two days ago
    let mut old = tracking.run(&r4).unwrap();
    old.deleted_ms = Some(now_ms() - 2 * 86_400_000);
    store.put::<TrackingRuns>(&old.id, &old).unwrap();

    let dirs = std::cell::RefCell::new(Vec::new());
    let gc = |request: &GcRequest| {
        tracking.gc(&op(), request, |dir| {
            dirs.borrow_mut().push(dir.to_owned());
            Ok(2)
        })
    };
    let named = |runs: &[&String]| GcRequest {
        run_ids: Some(runs.iter().map(|r| r.to_string()).collect()),
        ..GcRequest::default()
    };
    let day = Some(86_400_000);
    forbidden(tracking.gc(&a, &GcRequest::default(), |_| Ok(0)));
    refused(gc(&named(&[&r2, &r3])), &format!("Runs [{r3}] are not in the deleted lifecycle stage"));
    refused(
        gc(&GcRequest { older_than_ms: day, ..named(&[&r2, &r4]) }),
        &format!("Runs [{r2}] were deleted less than 1day ago"),
    );
    refused(
        gc(&GcRequest { experiment_ids: Some(vec![kept.to_string()]), ..GcRequest::default() }),
        &format!("Experiments [{kept}] are not in the deleted lifecycle stage"),
    );
    assert!(matches!(gc(&named(&[&"0".repeat(32)])), Err(RegistryError::NotFound(_))));
    assert!(tracking.run(&r2).is_ok() && tracking.run(&r4).is_ok(), "a refused call deletes nothing");

    // With an age, only r4 is old enough.
    let report = gc(&GcRequest { older_than_ms: day, ..GcRequest::default() }).unwrap();
    assert_eq!((report.runs, report.metric_points, report.artifact_files), (vec![r4.clone()], 25, 2));
    assert!(report.experiments.is_empty() && report.logged_models.is_empty());
    assert!(matches!(tracking.run(&r4), Err(RegistryError::NotFound(_))));

    // Without one, everything deleted: r2, the doomed experiment with r1 and m1, and m2.
    let report = gc(&GcRequest::default()).unwrap();
    let mut runs = report.runs.clone();
    runs.sort();
    let mut want = vec![r1.clone(), r2.clone()];
    want.sort();
    assert_eq!(runs, want);
    let mut models = report.logged_models.clone();
    models.sort();
    let mut want = vec![m1.clone(), m2.clone()];
    want.sort();
    assert_eq!(models, want);
    assert_eq!(report.experiments, [doomed.to_string()]);
    assert_eq!((report.metric_points, report.artifact_files), (50, 8));
    let dirs = dirs.borrow().clone();
    for (r, e) in [(&r1, doomed), (&r2, kept), (&r4, kept)] {
        assert!(dirs.contains(&format!("{e}/{r}/artifacts")), "{dirs:?}");
    }
    assert!(dirs.contains(&format!("{doomed}/models/{m1}/artifacts")), "{dirs:?}");
    for r in [&r1, &r2] {
        assert!(matches!(tracking.run(r), Err(RegistryError::NotFound(_))));
        assert_eq!(store.scan::<TrackingMetrics>(&parse_run_id(r).unwrap(), None, false).count(), 0);
    }
    assert!(matches!(tracking.logged_model(&m2, true), Err(RegistryError::NotFound(_))));
    assert!(matches!(tracking.experiment(doomed), Err(RegistryError::NotFound(_))));
    assert_eq!(tracking.create_experiment(&a, "doomed", None, vec![]).unwrap(), kept + 1, "the name is free");
    let live = tracking.search_runs(&[kept], ViewType::All, &[], &[]).unwrap();
    assert_eq!(live.iter().map(RunRecord::run_id).collect::<Vec<_>>(), std::slice::from_ref(&r3));
    assert_eq!(tracking.run(&r3).unwrap().latest["loss"].value, 0.5);
    assert_eq!(store.iter::<TrackingExperimentRuns>().count(), 1);
    assert_eq!(store.iter::<TrackingExperimentModels>().count(), 0);
    assert_eq!(gc(&GcRequest::default()).unwrap(), GcReport::default(), "nothing is left to collect");

    let actions: Vec<String> = store.iter::<AuditLog>().map(|e| e.unwrap().1.action).collect();
    assert_eq!(actions.iter().filter(|a| a.starts_with("tracking.run_purged")).count(), 3);
    assert_eq!(actions.iter().filter(|a| a.starts_with("tracking.model_purged")).count(), 2);
    assert_eq!(actions.iter().filter(|a| a.starts_with("tracking.experiment_purged doomed")).count(), 1);
}
