//! Jobs: watch streams and dashboards, resuming, and fan-out across instances and
//! through Redis outages.
use std::{collections::HashSet, time::Duration};

use mediaplane::proto::v1::{self as pb, job::State, job_event::Type};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::helpers::*;

use super::*;

#[tokio::test]
async fn two_instances_a_watcher_on_one_and_a_worker_on_the_other_see_every_event_in_order() {
    let a = TestApp::spawn().await;
    let b = a.spawn_peer().await;
    let t = token("alice");
    let p = create_project(&a, &t, "fleet").await;
    let created = create_job(&a, &t, &p.name, job("render")).await;
    let mut watcher = watch(&a, &t, &created.name, 0).await;
    let mut dashboard = a
        .jobs(&t)
        .watch_jobs(pb::WatchJobsRequest {
            parent: p.name.clone(),
            filter: String::new(),
        })
        .await
        .unwrap()
        .into_inner();

    let l = acquire(&b, "b-worker", &["render"], 1, 30.0, 5.0)
        .await
        .remove(0);
    for pct in (10..=90).step_by(10) {
        progress(&b, &l, pct, &format!("step {pct}")).await.unwrap();
    }
    complete(&b, &l).await.unwrap();

    let events = collect(&mut watcher, Duration::from_secs(10)).await;
    let seqs: Vec<i64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(
        seqs,
        (1..=12).collect::<Vec<_>>(),
        "snapshot, lease, 9 progress reports, completion"
    );
    assert_eq!(Type::try_from(events[0].r#type).unwrap(), Type::Snapshot);
    let pcts: Vec<i32> = events[2..11]
        .iter()
        .map(|e| e.job.as_ref().unwrap().progress_percent)
        .collect();
    assert_eq!(pcts, (10..=90).step_by(10).collect::<Vec<_>>());
    assert_eq!(state(events.last().unwrap()), State::Succeeded);

    let mut seen = Vec::new();
    while let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_secs(3), dashboard.next()).await
    {
        seen.push(e.sequence);
        if e.sequence == 12 {
            break;
        }
    }
    assert_eq!(
        seen.last(),
        Some(&12),
        "the dashboard follows too: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[1] > w[0]), "{seen:?}");
}

async fn dashboard(
    app: &TestApp,
    t: &str,
    parent: &str,
    filter: &str,
) -> tonic::Streaming<pb::JobEvent> {
    app.jobs(t)
        .watch_jobs(pb::WatchJobsRequest {
            parent: parent.to_owned(),
            filter: filter.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// (job name, state) of each event.
fn named_states(events: &[pb::JobEvent]) -> Vec<(String, State)> {
    events
        .iter()
        .map(|e| (e.job.as_ref().unwrap().name.clone(), state(e)))
        .collect()
}

#[tokio::test]
async fn a_filtered_dashboard_gets_its_jobs_however_many_others_changed_since() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "busy").await;
    let render = create_job(&app, &t, &p.name, job("render")).await;
    // 1,000 jobs of another kind, all changed after the render job (more than a
    // dashboard's first snapshot holds).
    app.jobs(&t)
        .batch_create_jobs(pb::BatchCreateJobsRequest {
            parent: p.name.clone(),
            requests: (0..1000)
                .map(|_| pb::CreateJobRequest {
                    parent: String::new(),
                    job: Some(job("transcode")),
                    request_id: String::new(),
                    key: String::new(),
                })
                .collect(),
        })
        .await
        .unwrap();

    let mut renders = dashboard(&app, &t, &p.name, "kind = \"render\"").await;
    let events = collect(&mut renders, Duration::from_secs(2)).await;
    assert_eq!(
        named_states(&events),
        vec![(render.name.clone(), State::Queued)]
    );
    let mut queued = dashboard(&app, &t, &p.name, "state = QUEUED AND kind = \"render\"").await;
    let events = collect(&mut queued, Duration::from_secs(2)).await;
    assert_eq!(
        named_states(&events),
        vec![(render.name.clone(), State::Queued)]
    );

    // Unfiltered: the 1,000 changed last (read a page at a time), each once.
    let mut all = dashboard(&app, &t, &p.name, "").await;
    let events = collect(&mut all, Duration::from_secs(3)).await;
    assert_eq!(events.len(), 1000);
    let names: HashSet<&str> = events
        .iter()
        .map(|e| e.job.as_ref().unwrap().name.as_str())
        .collect();
    assert_eq!(names.len(), 1000);
    assert!(
        !names.contains(render.name.as_str()),
        "the oldest change is not among them"
    );
}

#[tokio::test]
async fn a_job_leaving_a_dashboards_filter_is_sent_once_more() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "queue view").await;
    let mut queued = dashboard(&app, &t, &p.name, "state = QUEUED").await;
    let a = create_job(&app, &t, &p.name, job("render")).await;
    let l = acquire(&app, "w", &["render"], 1, 30.0, 5.0)
        .await
        .remove(0);
    progress(&app, &l, 50, "half").await.unwrap();
    complete(&app, &l).await.unwrap();
    let b = create_job(&app, &t, &p.name, job("render")).await;

    let events = collect(&mut queued, Duration::from_secs(2)).await;
    assert_eq!(
        named_states(&events),
        vec![
            (a.name.clone(), State::Queued),
            // The change that takes it out of the view, so the dashboard drops it;
            // its progress and completion are not for this view.
            (a.name.clone(), State::Running),
            (b.name, State::Queued),
        ]
    );
}

#[tokio::test]
async fn a_dashboard_of_a_deleted_project_ends_with_not_found() {
    let app = TestApp::spawn_with(|s| s.watch_resync = Duration::from_millis(300)).await;
    let t = token("alice");
    let p = create_project(&app, &t, "short-lived").await;
    create_job(&app, &t, &p.name, job("render")).await;
    let mut all = dashboard(&app, &t, &p.name, "").await;
    assert_eq!(collect(&mut all, Duration::from_millis(500)).await.len(), 1);
    app.projects(&t)
        .delete_project(pb::DeleteProjectRequest {
            name: p.name.clone(),
            etag: String::new(),
        })
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), all.next())
        .await
        .expect("the stream ends after the next resync");
    assert_eq!(
        end.expect("a final status").unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn a_dashboard_learns_of_a_job_that_left_its_filter_while_redis_was_away() {
    let (app, proxy) = app_behind_redis_proxy().await;
    let t = token("alice");
    let p = create_project(&app, &t, "queue view").await;
    let a = create_job(&app, &t, &p.name, job("render")).await;
    let mut queued = dashboard(&app, &t, &p.name, "state = QUEUED").await;
    let first = collect(&mut queued, Duration::from_secs(1)).await;
    assert_eq!(named_states(&first), vec![(a.name.clone(), State::Queued)]);

    proxy.cut().await;
    // Its event is published while this instance is not subscribed: lost.
    acquire(&app, "w", &["render"], 1, 30.0, 5.0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();

    // Back on Redis, the dashboard re-reads Postgres; the job no longer matches its
    // filter, and it must still hear that.
    let events = collect(&mut queued, Duration::from_secs(10)).await;
    assert_eq!(named_states(&events), vec![(a.name, State::Running)]);
}

/// A change whose transaction ran longer than the resyncs between its start and its
/// commit, and whose Redis event never came (written straight in SQL, as a lost
/// message would leave it): its update_time is the transaction's start, long before
/// it became visible. A resync must still find it.
#[tokio::test]
async fn a_dashboard_finds_a_change_whose_transaction_outlived_several_resyncs() {
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    let app = TestApp::spawn_with(|s| s.watch_resync = Duration::from_millis(300)).await;
    let t = token("alice");
    let p = create_project(&app, &t, "slow writer").await;
    let a = create_job(&app, &t, &p.name, job("render")).await;
    let mut all = dashboard(&app, &t, &p.name, "").await;
    assert_eq!(collect(&mut all, Duration::from_millis(500)).await.len(), 1);

    let id = a.name.rsplit('/').next().unwrap();
    let mut writer = diesel_async::AsyncPgConnection::establish(&app.db.url())
        .await
        .unwrap();
    writer
        .batch_execute(&format!(
            "BEGIN; UPDATE jobs SET current_step = 'slow', progress_percent = 7 WHERE id = '{id}'"
        ))
        .await
        .unwrap();
    // Many resyncs pass while the transaction is open, and more than any fixed overlap.
    tokio::time::sleep(Duration::from_secs(7)).await;
    writer.batch_execute("COMMIT").await.unwrap();

    let events = collect(&mut all, Duration::from_secs(3)).await;
    assert!(
        events
            .iter()
            .any(|e| e.job.as_ref().is_some_and(|j| j.current_step == "slow")),
        "the change was found by a resync: {events:?}"
    );
}

#[tokio::test]
async fn resuming_a_watch_gets_exactly_what_was_missed() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "resume").await;
    let mut labelled = job("render");
    labelled.labels = [("shot".to_owned(), "12".to_owned())].into();
    let created = create_job(&app, &t, &p.name, labelled).await;
    // Sees every change live, to compare with what a resume replays from Postgres.
    let mut live = watch(&app, &t, &created.name, 0).await;
    let l = acquire(&app, "w", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    for (pct, step) in [(20, "decode"), (40, "render"), (60, "encode")] {
        progress(&app, &l, pct, step).await.unwrap();
    }
    // Seen up to sequence 3 (created, leased, 20%): resume gets 4 and 5, then live events.
    let mut stream = watch(&app, &t, &created.name, 3).await;
    app.jobs(&t)
        .cancel_job(pb::CancelJobRequest {
            name: created.name.clone(),
        })
        .await
        .unwrap();
    complete(&app, &l).await.unwrap();
    let events = collect(&mut stream, Duration::from_secs(10)).await;
    assert_eq!(
        events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        vec![4, 5, 6, 7]
    );
    assert_eq!(Type::try_from(events[0].r#type).unwrap(), Type::Progress);
    // Replayed events are the events as they were published, snapshot and all.
    let live = collect(&mut live, Duration::from_secs(10)).await;
    assert_eq!(
        live.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6, 7]
    );
    // (6 and 7 may arrive as a snapshot: they can commit before the replay ends.)
    assert_eq!(events[..2], live[3..5]);
    assert_eq!(events[0].job.as_ref().unwrap().current_step, "render");
    assert_eq!(events[0].job.as_ref().unwrap().labels["shot"], "12");
    // Of a finished job, every event after the first is replayed from Postgres: the
    // types the database records (leased, progress, cancel requested, succeeded) are
    // the ones that were published.
    let mut replay = watch(&app, &t, &created.name, 1).await;
    let replayed = collect(&mut replay, Duration::from_secs(10)).await;
    assert_eq!(replayed[..], live[1..]);
    assert_eq!(
        replayed
            .iter()
            .map(|e| Type::try_from(e.r#type).unwrap())
            .collect::<Vec<_>>(),
        vec![
            Type::StateChanged,
            Type::Progress,
            Type::Progress,
            Type::Progress,
            Type::CancelRequested,
            Type::StateChanged
        ]
    );

    // When the events are gone (pruned), a resume gets a fresh snapshot.
    let mut conn = <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(
        &app.db.url(),
    )
    .await
    .unwrap();
    diesel_async::SimpleAsyncConnection::batch_execute(
        &mut conn,
        "DELETE FROM job_events WHERE sequence < 7",
    )
    .await
    .unwrap();
    let mut stream = watch(&app, &t, &created.name, 2).await;
    let events = collect(&mut stream, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        (
            Type::try_from(events[0].r#type).unwrap(),
            events[0].sequence
        ),
        (Type::Snapshot, 7)
    );
}

#[tokio::test]
async fn resuming_far_behind_replays_every_event_a_page_at_a_time() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "long render").await;
    let created = create_job(&app, &t, &p.name, job("render")).await;
    let l = acquire(&app, "w", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    // 250 reports: several pages of the replay (32 events each).
    for n in 1..=250 {
        progress(&app, &l, n * 100 / 250, &format!("frame {n}"))
            .await
            .unwrap();
    }
    let mut resumed = watch(&app, &t, &created.name, 1).await;
    let first = collect(&mut resumed, Duration::from_secs(2)).await;
    complete(&app, &l).await.unwrap();
    let rest = collect(&mut resumed, Duration::from_secs(10)).await;
    let events: Vec<_> = first.into_iter().chain(rest).collect();
    assert_eq!(
        events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        (2..=253).collect::<Vec<_>>(),
        "every event after the first, none skipped for a snapshot"
    );
    assert!(
        events[1..251]
            .iter()
            .enumerate()
            .all(|(i, e)| Type::try_from(e.r#type) == Ok(Type::Progress)
                && e.job.as_ref().unwrap().current_step == format!("frame {}", i + 1)),
        "the reports, replayed in order"
    );
    assert_eq!(state(events.last().unwrap()), State::Succeeded);
}

#[tokio::test]
async fn a_watch_survives_a_redis_outage_and_still_sees_the_terminal_state() {
    let (app, proxy) = app_behind_redis_proxy().await;
    let t = token("alice");
    let p = create_project(&app, &t, "outage").await;
    let created = create_job(&app, &t, &p.name, job("render")).await;
    let mut stream = watch(&app, &t, &created.name, 0).await;
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(state(&first), State::Queued);

    proxy.cut().await;
    // Everything a client is told succeeds while Redis is gone.
    let l = acquire(&app, "w", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    progress(&app, &l, 50, "half").await.unwrap();
    complete(&app, &l).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();

    let events = collect(&mut stream, Duration::from_secs(15)).await;
    let last = events.last().expect("events after Redis came back");
    assert_eq!(state(last), State::Succeeded, "the terminal state arrives");
    let mut seq = first.sequence;
    for e in &events {
        assert!(e.sequence > seq, "never backwards");
        seq = e.sequence;
    }
}

#[tokio::test]
async fn a_slow_watcher_gets_the_newest_snapshot_not_a_backlog() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "slow").await;
    let created = create_job(&app, &t, &p.name, job("render")).await;
    // A client with small HTTP/2 windows (a slow link) opens the watch, then does not
    // read while the job produces far more than the transport buffers.
    let slow = tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect()
        .await
        .unwrap();
    let mut slow =
        pb::jobs_service_client::JobsServiceClient::with_interceptor(slow, Bearer::new(&t));
    let mut stream = slow
        .watch_job(pb::WatchJobRequest {
            name: created.name.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let l = acquire(&app, "w", &["render"], 1, 60.0, 0.0)
        .await
        .remove(0);
    let reports = 600;
    let mut c = app.jobs(&worker());
    for i in 0..reports {
        c.report_progress(pb::ReportProgressRequest {
            name: created.name.clone(),
            lease_id: l.lease_id.clone(),
            progress_percent: i % 100,
            current_step: format!("frame {i}"),
            message: "x".repeat(1000),
        })
        .await
        .unwrap();
    }
    complete(&app, &l).await.unwrap();

    let events = collect(&mut stream, Duration::from_secs(10)).await;
    let last = events.last().expect("events");
    assert_eq!(state(last), State::Succeeded, "the newest state arrives");
    assert!(
        events.len() < reports as usize,
        "no full backlog was kept: {} events",
        events.len()
    );
    let snapshots_after_start = events
        .iter()
        .skip(1)
        .filter(|e| Type::try_from(e.r#type) == Ok(Type::Snapshot))
        .count();
    assert!(
        snapshots_after_start >= 1,
        "the gap was bridged by a snapshot"
    );
    assert!(
        events.windows(2).all(|w| w[1].sequence > w[0].sequence),
        "in order"
    );
}

#[tokio::test]
async fn watches_end_unauthenticated_when_their_token_expires() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "expiring watch").await;
    let created = create_job(&app, &t, &p.name, job("render")).await;
    let expiring = expiring_token("alice", &[]);
    let mut one = watch(&app, &expiring, &created.name, 0).await;
    let mut all = dashboard(&app, &expiring, &p.name, "").await;
    let first = one.message().await.unwrap().expect("the snapshot");
    assert_eq!(first.r#type(), Type::Snapshot);
    for stream in [&mut one, &mut all] {
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("the watch ends when the token expires")
            {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("ended without a status"),
                Err(status) => break status,
            }
        };
        assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    }
    // With a fresh token the watcher resumes.
    let mut again = watch(&app, &t, &created.name, 0).await;
    assert!(again.message().await.unwrap().is_some());
}
