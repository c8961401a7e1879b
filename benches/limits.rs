//! What the limits cost, and what a noisy neighbour costs: prints figures, asserts
//! nothing about speed.
//!
//!     cargo bench --bench limits          (needs Postgres and Redis on localhost)
//!
//! 1. The limiter's cost: GetProject and CreateProject throughput (64 connections,
//!    one principal) against a release server with rate limits on, set high enough
//!    never to be reached (every call still decided through Redis), and against one
//!    with them off; alternating rounds, the median of each. Target: on/off >= 95%.
//! 2. The noisy neighbour: one user's CreateProject rate (32 connections) alone, and
//!    while another user sends 800 creates/s that fail (the rate that halved a
//!    neighbour's creates before validation matched storage; 16 connections: a NUL
//!    in the display name, a NUL in a metadata key, a Struct nested past the limit,
//!    and a request_id reused with another payload, which fails in the database's
//!    insert), rate limits off so nothing holds the neighbour back.
//!    Target: with/alone >= 90%.
use std::time::{Duration, Instant};

use common::{Bearer, channel, start_server, token};
use mediaplane::proto::v1::{self as pb, projects_service_client::ProjectsServiceClient};
use prost_types::{Struct, Value, value::Kind};

mod common;

const RUN: Duration = Duration::from_secs(4);
const ROUNDS: usize = 5;
/// Failing creates per second the noisy neighbour offers.
const NOISE_RATE: u64 = 800;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Clone, Copy)]
enum Route {
    Get,
    Create,
}

type Client = ProjectsServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

async fn clients(addr: &str, t: &str, n: usize) -> Vec<Client> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(ProjectsServiceClient::with_interceptor(
            channel(addr).await,
            Bearer(t.to_owned()),
        ));
    }
    out
}

/// Calls per second of `route` over `clients` for `RUN`.
async fn rate(clients: &[Client], route: Route, name: &str) -> f64 {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let mut c = c.clone();
        let name = name.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < RUN {
                match route {
                    Route::Get => {
                        c.get_project(pb::GetProjectRequest { name: name.clone() })
                            .await
                            .expect("get");
                    }
                    Route::Create => {
                        c.create_project(pb::CreateProjectRequest {
                            project: Some(pb::Project {
                                display_name: format!("bench {i}-{n}"),
                                ..Default::default()
                            }),
                            request_id: String::new(),
                        })
                        .await
                        .expect("create");
                    }
                }
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

fn nested(levels: usize) -> Struct {
    let mut s = Struct::default();
    for _ in 0..levels {
        s = Struct {
            fields: [(
                "a".to_owned(),
                Value {
                    kind: Some(Kind::StructValue(s)),
                },
            )]
            .into(),
        };
    }
    s
}

/// Creates that fail, `NOISE_RATE` a second over all `clients`, until `stop`.
async fn noise(clients: Vec<Client>, stop: Instant) -> u64 {
    let mut tasks = Vec::new();
    let every = Duration::from_micros(1_000_000 * clients.len() as u64 / NOISE_RATE);
    for (i, mut c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut tick = tokio::time::interval(every);
            // MP_BENCH_NOISE=validation or storage sends only that kind of failure.
            let kinds: &[u64] = match std::env::var("MP_BENCH_NOISE").as_deref() {
                Ok("validation") => &[0, 1, 2],
                Ok("storage") => &[3],
                _ => &[0, 1, 2, 3],
            };
            while Instant::now() < stop {
                tick.tick().await;
                let (project, request_id) = match kinds[n as usize % kinds.len()] {
                    0 => (
                        pb::Project {
                            display_name: "nul\0name".into(),
                            ..Default::default()
                        },
                        String::new(),
                    ),
                    1 => (
                        pb::Project {
                            display_name: "ok".into(),
                            metadata: Some(Struct {
                                fields: [(
                                    "k\0".to_owned(),
                                    Value {
                                        kind: Some(Kind::BoolValue(true)),
                                    },
                                )]
                                .into(),
                            }),
                            ..Default::default()
                        },
                        String::new(),
                    ),
                    2 => (
                        pb::Project {
                            display_name: "deep".into(),
                            metadata: Some(nested(33)),
                            ..Default::default()
                        },
                        String::new(),
                    ),
                    // The first use of this id succeeded; each later one has another
                    // payload and is refused by the insert itself.
                    _ => (
                        pb::Project {
                            display_name: format!("replay {n}"),
                            ..Default::default()
                        },
                        format!("noisy-{i}"),
                    ),
                };
                let _ = c
                    .create_project(pb::CreateProjectRequest {
                        project: Some(project),
                        request_id,
                    })
                    .await;
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

#[tokio::main]
async fn main() {
    let high = "1000000/s:1000000".to_owned();
    let on = start_server(
        "limits_on",
        &[
            ("MEDIAPLANE_RATE_LIMITS", "on".to_owned()),
            ("MEDIAPLANE_LIMIT_READS", high.clone()),
            ("MEDIAPLANE_LIMIT_WRITES", high),
        ],
    );
    let off = start_server("limits_off", &[]);
    let t = token("bench", &[]);
    let (c_on, c_off) = (
        clients(&on.addr, &t, 64).await,
        clients(&off.addr, &t, 64).await,
    );
    let mut seed_on = c_on[0].clone();
    let mut seed_off = c_off[0].clone();
    let seed = |display: &str| pb::CreateProjectRequest {
        project: Some(pb::Project {
            display_name: display.into(),
            ..Default::default()
        }),
        request_id: String::new(),
    };
    let name_on = seed_on
        .create_project(seed("read me"))
        .await
        .unwrap()
        .into_inner()
        .name;
    let name_off = seed_off
        .create_project(seed("read me"))
        .await
        .unwrap()
        .into_inner()
        .name;

    // MP_BENCH_ONLY=noise skips the limiter's cost.
    let only_noise = std::env::var("MP_BENCH_ONLY").as_deref() == Ok("noise");
    println!(
        "The limiter's cost: 64 connections, one principal, median of {ROUNDS} alternating {}s runs\n",
        RUN.as_secs()
    );
    println!(
        "{:<14} {:>14} {:>14} {:>8}",
        "route", "limits on/s", "limits off/s", "on/off"
    );
    let routes = [(Route::Get, "GetProject"), (Route::Create, "CreateProject")];
    for (route, label) in routes.into_iter().filter(|_| !only_noise) {
        let (mut ons, mut offs) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            offs.push(rate(&c_off, route, &name_off).await);
            ons.push(rate(&c_on, route, &name_on).await);
        }
        let (a, b) = (median(ons), median(offs));
        println!("{label:<14} {a:>14.0} {b:>14.0} {:>7.1}%", 100.0 * a / b);
    }
    drop((c_on, on));

    let quiet = clients(&off.addr, &token("quiet", &[]), 32).await;
    let noisy = clients(&off.addr, &token("noisy", &[]), 16).await;
    // Each noisy connection's request_id is taken once, successfully.
    for (i, c) in noisy.iter().enumerate() {
        c.clone()
            .create_project(pb::CreateProjectRequest {
                project: Some(pb::Project {
                    display_name: "first".into(),
                    ..Default::default()
                }),
                request_id: format!("noisy-{i}"),
            })
            .await
            .unwrap();
    }
    let (mut alone, mut beside, mut noise_rates) = (Vec::new(), Vec::new(), Vec::new());
    // CPU seconds per second of the server, of this process and of the machine.
    let pid = off.child.id();
    let cpu = || {
        (
            common::cpu_secs(pid),
            common::cpu_secs(std::process::id()),
            common::machine_busy_secs(),
        )
    };
    let per_sec = |a: (f64, f64, f64), b: (f64, f64, f64), secs: f64| {
        ((b.0 - a.0) / secs, (b.1 - a.1) / secs, (b.2 - a.2) / secs)
    };
    let (mut cpu_alone, mut cpu_beside) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (c0, t0) = (cpu(), Instant::now());
        alone.push(rate(&quiet, Route::Create, "").await);
        cpu_alone.push(per_sec(c0, cpu(), t0.elapsed().as_secs_f64()));
        let stop = Instant::now() + RUN + Duration::from_millis(200);
        let neighbour = tokio::spawn(noise(noisy.clone(), stop));
        let (c0, t0) = (cpu(), Instant::now());
        beside.push(rate(&quiet, Route::Create, "").await);
        cpu_beside.push(per_sec(c0, cpu(), t0.elapsed().as_secs_f64()));
        noise_rates.push(neighbour.await.unwrap() as f64 / (RUN.as_secs_f64() + 0.2));
    }
    let (a, b) = (median(alone), median(beside));
    let avg = |v: &[(f64, f64, f64)]| {
        let n = v.len() as f64;
        (
            v.iter().map(|x| x.0).sum::<f64>() / n,
            v.iter().map(|x| x.1).sum::<f64>() / n,
            v.iter().map(|x| x.2).sum::<f64>() / n,
        )
    };
    let (ca, cb) = (avg(&cpu_alone), avg(&cpu_beside));
    println!(
        "\nThe noisy neighbour: one user's creates (32 connections), median of {ROUNDS} alternating {}s runs\n",
        RUN.as_secs()
    );
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>12}",
        "", "creates/s", "server cpu", "bench cpu", "machine cpu"
    );
    println!(
        "{:<34} {a:>12.0} {:>12.2} {:>12.2} {:>12.2}",
        "alone", ca.0, ca.1, ca.2
    );
    println!(
        "{:<34} {b:>12.0} {:>12.2} {:>12.2} {:>12.2}",
        format!("beside {:.0} failing creates/s", median(noise_rates)),
        cb.0,
        cb.1,
        cb.2
    );
    println!("{:<34} {:>11.1}%", "with/alone", 100.0 * b / a);
}
