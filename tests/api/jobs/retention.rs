//! Jobs: retention (pruning finished jobs and old events) and project deletion.
use std::time::Duration;

use mediaplane::proto::v1::{self as pb, job::State};
use tonic::Code;

use crate::helpers::*;

use super::*;

#[tokio::test]
async fn finished_jobs_are_pruned_after_the_retention() {
    let app = TestApp::spawn_with(|s| {
        s.reap_interval = Duration::from_millis(50);
        s.job_retention = Duration::from_secs(1);
    })
    .await;
    let t = token("alice");
    let p = create_project(&app, &t, "prune").await;
    let keep = create_job(&app, &t, &p.name, job("transcode")).await;
    let done = create_job(&app, &t, &p.name, job("render")).await;
    let l = acquire(&app, "w", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    complete(&app, &l).await.unwrap();
    eventually(Duration::from_secs(15), "finished job pruned", || {
        let mut c = app.jobs(&t);
        let name = done.name.clone();
        async move {
            c.get_job(pb::GetJobRequest { name })
                .await
                .is_err_and(|e| e.code() == Code::NotFound)
        }
    })
    .await;
    get(&app, &t, &keep.name).await;
    assert_eq!(
        stored_events(&app, &done.name).await,
        0,
        "events go with the job"
    );
    assert_eq!(stored_events(&app, &keep.name).await, 1);
}

/// Pruning waits on a lock (an operator's transaction holding an old job's events):
/// leases that expire meanwhile are still reaped.
#[tokio::test]
async fn a_prune_held_up_does_not_hold_up_expired_leases() {
    use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
    let app = TestApp::spawn_with(|s| {
        s.reap_interval = Duration::from_millis(100);
        s.job_retention = Duration::from_secs(1);
    })
    .await;
    let t = token("alice");
    let p = create_project(&app, &t, "prune and reap").await;
    let old = create_job(&app, &t, &p.name, job("render")).await;
    let l = acquire(&app, "w", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    complete(&app, &l).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let id = old.name.rsplit('/').next().unwrap();
    let mut holder = diesel_async::AsyncPgConnection::establish(&app.db.url())
        .await
        .unwrap();
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM job_events WHERE job_id = '{id}' FOR UPDATE"
        ))
        .await
        .unwrap();
    // The next prune deletes the old job, and waits for its events' lock.
    let mut watcher = diesel_async::AsyncPgConnection::establish(&app.db.url())
        .await
        .unwrap();
    #[derive(diesel::QueryableByName)]
    struct Waiting {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let blocked = tokio::time::Instant::now();
    loop {
        let w: Waiting = diesel::sql_query(
            "SELECT count(*) AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
               AND query LIKE 'DELETE FROM jobs%'",
        )
        .get_result(&mut watcher)
        .await
        .unwrap();
        if w.n > 0 {
            break;
        }
        assert!(
            blocked.elapsed() < Duration::from_secs(15),
            "no prune waited on the lock"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let fresh = create_job(&app, &t, &p.name, job("render")).await;
    acquire(&app, "w2", &["render"], 1, 1.0, 0.0).await;
    // Its lease expires in a second; the reaper puts it back for another attempt.
    eventually(Duration::from_secs(5), "the expired lease reaped", || {
        let (app, t, name) = (&app, &t, fresh.name.clone());
        async move { get(app, t, &name).await.state == State::Queued as i32 }
    })
    .await;
    holder.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test]
async fn retention_deletes_in_bounded_batches() {
    use diesel_async::AsyncConnection;
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "prune in batches").await;
    let keep = create_job(&app, &t, &p.name, job("transcode")).await;
    let mut done = Vec::new();
    for _ in 0..3 {
        done.push(create_job(&app, &t, &p.name, job("render")).await.name);
    }
    for l in acquire(&app, "w", &["render"], 3, 30.0, 0.0).await {
        complete(&app, &l).await.unwrap();
    }
    let mut conn = diesel_async::AsyncPgConnection::establish(&app.db.url())
        .await
        .unwrap();
    let now = chrono::Utc::now();
    // Events are kept (their cut-off is long ago); finished jobs go, two per statement.
    let old = now - chrono::Duration::days(1);
    let mut deleted = Vec::new();
    for _ in 0..3 {
        let (jobs, events) = mediaplane::db::jobs::prune(&mut conn, now, old, 2)
            .await
            .unwrap();
        assert_eq!(events, 0);
        deleted.push(jobs);
    }
    assert_eq!(
        deleted,
        [2, 1, 0],
        "at most a batch per statement, until none is left"
    );
    for name in &done {
        assert_eq!(stored_events(&app, name).await, 0, "events go with the job");
    }
    get(&app, &t, &keep.name).await;
    // Events by age: the queued job's one event is the only one left.
    let (jobs, events) = mediaplane::db::jobs::prune(&mut conn, old, now, 2)
        .await
        .unwrap();
    assert_eq!((jobs, events), (0, 1));
    assert_eq!(stored_events(&app, &keep.name).await, 0);
}

#[tokio::test]
async fn deleting_a_project_deletes_its_jobs() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "doomed").await;
    let j = create_job(&app, &t, &p.name, job("render")).await;
    assert_eq!(stored_events(&app, &j.name).await, 1);
    app.projects(&t)
        .delete_project(pb::DeleteProjectRequest {
            name: p.name.clone(),
            etag: String::new(),
        })
        .await
        .unwrap();
    let err = app
        .jobs(&admin_token("root"))
        .get_job(pb::GetJobRequest {
            name: j.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        acquire(&app, "w", &["render"], 1, 30.0, 0.0)
            .await
            .is_empty()
    );
    assert_eq!(
        stored_events(&app, &j.name).await,
        0,
        "events go with the job"
    );
}

#[tokio::test]
async fn a_project_being_deleted_holds_up_its_own_calls_only() {
    use diesel_async::{AsyncConnection, RunQueryDsl};
    // Shared with the calls spawned to wait for the deletion.
    let app = std::sync::Arc::new(TestApp::spawn().await);
    let t = token("alice");
    let doomed = create_project(&app, &t, "doomed").await;
    let busy = create_project(&app, &t, "busy").await;
    let id: uuid::Uuid = doomed.name.rsplit('/').next().unwrap().parse().unwrap();
    // Two running jobs in the doomed project: one for a progress report (the shared
    // fenced statement's path), one for a FailJob (the path that locks jobs first).
    create_job(&app, &t, &doomed.name, job("doomed")).await;
    create_job(&app, &t, &doomed.name, job("doomed")).await;
    let doomed_leased = acquire(&app, "w-doomed", &["doomed"], 2, 120.0, 0.0).await;
    assert_eq!(doomed_leased.len(), 2);
    // A deletion in progress (one of a project with many jobs takes a while), run by
    // the server's own deletion code: the project's row and its jobs' rows stay locked
    // until its transaction ends, first in a rollback, then in a commit.
    let mut deletion = diesel_async::AsyncPgConnection::establish(&app.db.url())
        .await
        .unwrap();
    for end in ["ROLLBACK", "COMMIT"] {
        // This round's jobs in the other project, running.
        create_job(&app, &t, &busy.name, job("busy")).await;
        create_job(&app, &t, &busy.name, job("busy")).await;
        let busy_leased = acquire(&app, "w-busy", &["busy"], 2, 120.0, 0.0).await;
        assert_eq!(busy_leased.len(), 2);

        diesel::sql_query("BEGIN")
            .execute(&mut deletion)
            .await
            .unwrap();
        let outcome = mediaplane::db::projects::delete(&mut deletion, None, id, None)
            .await
            .unwrap();
        assert!(matches!(
            outcome,
            mediaplane::db::projects::Outcome::Done(())
        ));
        let (mut client, parent) = (app.jobs(&t), doomed.name.clone());
        let create = tokio::spawn(async move {
            client
                .create_job(pb::CreateJobRequest {
                    parent,
                    job: Some(job("render")),
                    request_id: String::new(),
                    key: String::new(),
                })
                .await
                .map(|r| r.into_inner().name)
        });
        let (a, leased) = (app.clone(), doomed_leased[0].clone());
        let report = tokio::spawn(async move {
            progress(&a, &leased, 50, "half")
                .await
                .map(|r| r.lease_expire_time.is_some())
        });
        let (a, leased) = (app.clone(), doomed_leased[1].clone());
        // Retryable: after a rollback the job is queued again.
        let failed =
            tokio::spawn(async move { fail(&a, &leased, true, None).await.map(|j| j.state()) });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let soon = Duration::from_secs(3);
        for _ in 0..3 {
            tokio::time::timeout(soon, create_job(&app, &t, &busy.name, job("render")))
                .await
                .expect("creates in other projects do not wait for the deletion");
        }
        tokio::time::timeout(soon, progress(&app, &busy_leased[0], 50, "half"))
            .await
            .expect("worker writes in other projects do not wait for the deletion")
            .unwrap();
        tokio::time::timeout(soon, complete(&app, &busy_leased[0]))
            .await
            .expect("worker writes in other projects do not wait for the deletion")
            .unwrap();
        tokio::time::timeout(soon, fail(&app, &busy_leased[1], false, None))
            .await
            .expect("worker writes in other projects do not wait for the deletion")
            .unwrap();
        assert!(
            !create.is_finished() && !report.is_finished() && !failed.is_finished(),
            "calls about the project being deleted wait for the deletion's outcome"
        );
        diesel::sql_query(end).execute(&mut deletion).await.unwrap();
        let created = tokio::time::timeout(Duration::from_secs(5), create)
            .await
            .expect("the create ends with the deletion")
            .unwrap();
        let reported = tokio::time::timeout(Duration::from_secs(5), report)
            .await
            .expect("the report ends with the deletion")
            .unwrap();
        let failed = tokio::time::timeout(Duration::from_secs(5), failed)
            .await
            .expect("the fail ends with the deletion")
            .unwrap();
        if end == "ROLLBACK" {
            let name = created.expect("the project is still there");
            assert!(name.starts_with(&doomed.name), "{name}");
            assert_eq!(get(&app, &t, &name).await.state(), State::Queued);
            assert!(reported.expect("the job is still there"));
            assert_eq!(failed.expect("the job is still there"), State::Queued);
        } else {
            for err in [
                created.unwrap_err(),
                reported.unwrap_err(),
                failed.unwrap_err(),
            ] {
                assert_eq!(err.code(), Code::NotFound, "{err:?}");
            }
        }
    }
}
