//! Complete and take the next job in one call (BatchCompleteJobs with `acquire`):
//! the jobs it leases are leased exactly as AcquireJobs leases them (fenced, expiring,
//! woken across instances), and a request it refuses writes nothing.
use super::*;

fn next(worker_id: &str, max: i32, lease: f64, wait: f64) -> Option<pb::AcquireJobsRequest> {
    Some(pb::AcquireJobsRequest {
        worker_id: worker_id.into(),
        kinds: vec!["render".into()],
        max_jobs: max,
        lease_duration: secs(lease),
        wait_timeout: secs(wait),
    })
}

async fn complete_and_next(
    app: &TestApp,
    done: &[&pb::LeasedJob],
    acquire: Option<pb::AcquireJobsRequest>,
) -> Result<pb::BatchCompleteJobsResponse, tonic::Status> {
    app.jobs(&worker())
        .batch_complete_jobs(pb::BatchCompleteJobsRequest {
            requests: done.iter().map(|l| completion(l)).collect(),
            acquire,
        })
        .await
        .map(|r| r.into_inner())
}

fn name(l: &pb::LeasedJob) -> String {
    l.job.as_ref().unwrap().name.clone()
}

#[tokio::test]
async fn a_worker_completes_and_takes_the_next_job_in_one_call_in_queue_order() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "next").await;
    let mut created = Vec::new();
    for _ in 0..3 {
        created.push(create_job(&app, &t, &p.name, job("render")).await.name);
    }
    let first = acquire(&app, "gpu-1", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    assert_eq!(name(&first), created[0]);

    let mut leased = first;
    for expected in &created[1..] {
        let answer = complete_and_next(&app, &[&leased], next("gpu-1", 1, 30.0, 0.0))
            .await
            .unwrap();
        assert_eq!(outcomes(&answer.results), vec![Code::Ok]);
        assert!(answer.acquire_error.is_none(), "{answer:?}");
        assert_eq!(answer.acquired.len(), 1, "{answer:?}");
        let following = answer.acquired.into_iter().next().unwrap();
        assert_eq!(&name(&following), expected, "in queue order");
        // Leased as AcquireJobs leases: RUNNING, to this worker, with a lease that expires.
        let job = get(&app, &t, expected).await;
        assert_eq!(job.state(), State::Running);
        assert_eq!(job.worker_id, "gpu-1");
        assert!(following.lease_expire_time.is_some());
        assert!(!following.lease_id.is_empty());
        leased = following;
    }
    // The queue is empty: the last completion stands and nothing comes with it.
    let answer = complete_and_next(&app, &[&leased], next("gpu-1", 5, 30.0, 0.0))
        .await
        .unwrap();
    assert_eq!(outcomes(&answer.results), vec![Code::Ok]);
    assert!(answer.acquired.is_empty());
    assert!(answer.acquire_error.is_none());
    for n in &created {
        assert_eq!(get(&app, &t, n).await.state(), State::Succeeded);
    }
}

#[tokio::test]
async fn jobs_taken_with_a_completion_are_fenced_and_come_back_when_their_worker_dies() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "next fencing").await;
    let a = create_job(&app, &t, &p.name, job("render")).await.name;
    let b = create_job(&app, &t, &p.name, job("render")).await.name;
    let first = acquire(&app, "gpu-1", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    assert_eq!(name(&first), a);
    // A refused completion (a lease that is not the current one) takes nothing back
    // and still lets the call lease.
    let mut stale = first.clone();
    stale.lease_id = uuid::Uuid::new_v4().to_string();
    let answer = complete_and_next(&app, &[&stale], next("gpu-1", 1, 1.0, 0.0))
        .await
        .unwrap();
    assert_eq!(outcomes(&answer.results), vec![Code::Aborted]);
    assert_eq!(get(&app, &t, &a).await.state(), State::Running);
    let second = answer.acquired.into_iter().next().expect("the next job");
    assert_eq!(name(&second), b);

    // The worker dies holding it (1 s lease, no heartbeat): it comes back to the
    // queue, another worker takes it, and the dead worker's late writes are refused.
    let again = acquire(&app, "gpu-2", &["render"], 1, 30.0, 5.0).await;
    assert_eq!(again.len(), 1, "the expired lease's job is leased again");
    assert_eq!(name(&again[0]), b);
    assert_eq!(again[0].job.as_ref().unwrap().attempt, 2);
    let late = complete(&app, &second).await.unwrap_err();
    assert_eq!(late.code(), Code::Aborted, "{late:?}");
    let late = complete_and_next(&app, &[&second], next("gpu-1", 1, 30.0, 0.0))
        .await
        .unwrap();
    assert_eq!(outcomes(&late.results), vec![Code::Aborted]);
    complete(&app, &again[0]).await.unwrap();
    complete(&app, &first).await.unwrap();
}

#[tokio::test]
async fn an_invalid_or_forbidden_acquire_writes_nothing() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "next refused").await;
    let a = create_job(&app, &t, &p.name, job("render")).await.name;
    create_job(&app, &t, &p.name, job("render")).await;
    let leased = acquire(&app, "gpu-1", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);

    let mut bad = next("gpu-1", 1000, 30.0, 0.0).unwrap();
    bad.kinds.clear();
    let err = complete_and_next(&app, &[&leased], Some(bad))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err), vec!["acquire.kinds", "acquire.max_jobs"]);
    assert_eq!(get(&app, &t, &a).await.state(), State::Running);

    // A token narrowed to other kinds may not take these.
    let limited = fleet_token_for("transcode");
    let err = app
        .jobs(&limited)
        .batch_complete_jobs(pb::BatchCompleteJobsRequest {
            requests: vec![completion(&leased)],
            acquire: next("gpu-1", 1, 30.0, 0.0),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(get(&app, &t, &a).await.state(), State::Running);
    assert_eq!(
        acquire(&app, "gpu-2", &["render"], 5, 30.0, 0.0)
            .await
            .len(),
        1,
        "the second job is still queued"
    );
}

#[tokio::test]
async fn a_completion_waits_for_the_next_job_created_on_another_instance() {
    let app = TestApp::spawn().await;
    let peer = app.spawn_peer().await;
    let t = token("alice");
    let p = create_project(&app, &t, "next across").await;
    create_job(&app, &t, &p.name, job("render")).await;
    let leased = acquire(&app, "gpu-1", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    let done = name(&leased);
    let mut c = app.jobs(&worker());
    let waiting = tokio::spawn(async move {
        c.batch_complete_jobs(pb::BatchCompleteJobsRequest {
            requests: vec![completion(&leased)],
            acquire: next("gpu-1", 1, 30.0, 20.0),
        })
        .await
        .expect("complete and wait")
        .into_inner()
    });
    // The completion is committed before the wait, not when the call returns.
    eventually(
        Duration::from_secs(5),
        "the completion is committed",
        || {
            let (app, t, done) = (&app, &t, &done);
            async move { get(app, t, done).await.state() == State::Succeeded }
        },
    )
    .await;
    let created = create_job(&peer, &t, &p.name, job("render")).await.name;
    let answer = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("woken before the wait ends")
        .unwrap();
    assert_eq!(outcomes(&answer.results), vec![Code::Ok]);
    assert_eq!(answer.acquired.len(), 1);
    assert_eq!(name(&answer.acquired[0]), created);
}

/// The transaction ids of `jobs`' rows as last written (`xmin`): rows written in one
/// transaction share it.
async fn writers(app: &TestApp, jobs: &[&String]) -> Vec<String> {
    use diesel_async::{AsyncConnection, RunQueryDsl};
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        xmin: String,
    }
    let mut conn = diesel_async::AsyncPgConnection::establish(&app.db.url())
        .await
        .unwrap();
    let mut out = Vec::new();
    for name in jobs {
        let id = name.rsplit('/').next().unwrap();
        let rows: Vec<Row> = diesel::sql_query(format!(
            "SELECT xmin::text AS xmin FROM jobs WHERE id = '{id}'"
        ))
        .load(&mut conn)
        .await
        .unwrap();
        out.push(rows.into_iter().next().unwrap().xmin);
    }
    out
}

#[tokio::test]
async fn completions_and_the_next_lease_commit_in_one_transaction() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "one transaction").await;
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(create_job(&app, &t, &p.name, job("render")).await.name);
    }
    let mut first = acquire(&app, "gpu-1", &["render"], 2, 30.0, 0.0).await;
    let (a, b) = (first.remove(0), first.remove(0));
    // A completion refused (a lease that is not current) takes nothing back from the
    // others or from the lease.
    let mut stale = completion(&b);
    stale.lease_id = uuid::Uuid::new_v4().to_string();
    let answer = app
        .jobs(&worker())
        .batch_complete_jobs(pb::BatchCompleteJobsRequest {
            requests: vec![completion(&a), stale],
            acquire: next("gpu-1", 2, 30.0, 0.0),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcomes(&answer.results), vec![Code::Ok, Code::Aborted]);
    let taken: Vec<String> = answer.acquired.iter().map(name).collect();
    assert_eq!(taken, created[2..4].to_vec(), "{answer:?}");
    // The completion and both leases were written by the same transaction.
    let ids = writers(&app, &[&created[0], &created[2], &created[3]]).await;
    assert!(ids.iter().all(|x| x == &ids[0]), "{ids:?}");
    assert_eq!(get(&app, &t, &created[0]).await.state(), State::Succeeded);
    assert_eq!(get(&app, &t, &created[1]).await.state(), State::Running);

    // A queue that runs one job at a time: the completion frees the slot for the lease
    // in the same transaction.
    pb::queues_service_client::QueuesServiceClient::with_interceptor(
        app.channel.clone(),
        Bearer::new(&admin_token("ops")),
    )
    .update_queue(pb::UpdateQueueRequest {
        queue: Some(pb::Queue {
            name: "queues/render".into(),
            max_running: 1,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["max_running".into()],
        }),
    })
    .await
    .unwrap();
    let complete = async |done: &[&pb::LeasedJob]| {
        complete_and_next(&app, done, next("gpu-1", 1, 30.0, 0.0))
            .await
            .unwrap()
    };
    // Three running against a limit of one: two completions leave one running, so
    // nothing is leased.
    let (c, d) = (&answer.acquired[0], &answer.acquired[1]);
    let answer = complete(&[&b, c]).await;
    assert_eq!(outcomes(&answer.results), vec![Code::Ok, Code::Ok]);
    assert!(answer.acquired.is_empty(), "over the limit: {answer:?}");
    // The last running job's completion frees the slot the lease takes, in one
    // transaction.
    let answer = complete(&[d]).await;
    assert_eq!(outcomes(&answer.results), vec![Code::Ok]);
    let taken: Vec<String> = answer.acquired.iter().map(name).collect();
    assert_eq!(taken, vec![created[4].clone()], "{answer:?}");
    let ids = writers(&app, &[&created[3], &created[4]]).await;
    assert_eq!(ids[0], ids[1]);
    for n in &created[..4] {
        assert_eq!(get(&app, &t, n).await.state(), State::Succeeded);
    }
}

#[tokio::test]
async fn a_job_taken_with_a_completion_hears_its_cancel_and_every_write_on_it_is_fenced() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "next cancel").await;
    create_job(&app, &t, &p.name, job("render")).await;
    let target = create_job(&app, &t, &p.name, job("render")).await.name;
    let first = acquire(&app, "gpu-1", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    let answer = complete_and_next(&app, &[&first], next("gpu-1", 1, 30.0, 0.0))
        .await
        .unwrap();
    let leased = answer.acquired.into_iter().next().expect("the next job");
    assert_eq!(name(&leased), target);

    // Every write under another lease id is refused and changes nothing.
    let mut stale = leased.clone();
    stale.lease_id = uuid::Uuid::new_v4().to_string();
    let refused = [
        progress(&app, &stale, 10, "x").await.unwrap_err().code(),
        complete(&app, &stale).await.unwrap_err().code(),
        fail(&app, &stale, true, None).await.unwrap_err().code(),
    ];
    assert_eq!(refused, [Code::Aborted; 3]);
    let job = get(&app, &t, &target).await;
    assert_eq!((job.state(), job.progress_percent), (State::Running, 0));

    // The client cancels it: the worker hears it on its next report, and its failure
    // then ends the job CANCELLED, not retried.
    app.jobs(&t)
        .cancel_job(pb::CancelJobRequest {
            name: target.clone(),
        })
        .await
        .unwrap();
    assert!(
        progress(&app, &leased, 50, "x")
            .await
            .unwrap()
            .cancel_requested
    );
    assert_eq!(
        fail(&app, &leased, true, None).await.unwrap().state(),
        State::Cancelled
    );
    let late = complete_and_next(&app, &[&leased], next("gpu-1", 1, 30.0, 0.0))
        .await
        .unwrap();
    assert_eq!(outcomes(&late.results), vec![Code::Aborted]);
}
