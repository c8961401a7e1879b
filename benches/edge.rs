//! HTTP/JSON edge vs native gRPC: prints figures, asserts nothing about speed.
//!
//!     cargo bench --bench edge            (needs Postgres and Redis on localhost)
//!
//! GetProject, CreateProject and ListProjects (page of 50) against the release server
//! with 10,000 projects in the table, 64 connections, a bearer token verified on
//! every call: requests/s and p50/p99 per route and transport, and edge/native.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::{Bearer, channel, start_server, token};
use mediaplane::proto::v1::{self as pb, projects_service_client::ProjectsServiceClient};

mod common;

const CONNECTIONS: usize = 64;
const RUN: Duration = Duration::from_secs(4);
const ROUNDS: usize = 3;

/// The run with the median throughput.
fn median(mut runs: Vec<Figures>) -> Figures {
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    runs.swap_remove(runs.len() / 2)
}

#[derive(Clone, Copy, Debug)]
enum Route {
    Get,
    Create,
    List,
}

struct Figures {
    rps: f64,
    p50: f64,
    p99: f64,
}

fn figures(mut lat: Vec<f64>, elapsed: Duration) -> Figures {
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Figures {
        rps: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.5),
        p99: at(0.99),
    }
}

async fn run_native(addr: &str, t: &str, route: Route, names: Arc<Vec<String>>) -> Figures {
    let mut tasks = Vec::new();
    let start = Instant::now();
    for i in 0..CONNECTIONS {
        let mut c =
            ProjectsServiceClient::with_interceptor(channel(addr).await, Bearer(t.to_owned()));
        let names = names.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut k = i;
            while start.elapsed() < RUN {
                let t0 = Instant::now();
                match route {
                    Route::Get => {
                        c.get_project(pb::GetProjectRequest {
                            name: names[k % names.len()].clone(),
                        })
                        .await
                        .unwrap();
                    }
                    Route::Create => {
                        let p = pb::Project {
                            display_name: format!("bench {k}"),
                            ..Default::default()
                        };
                        c.create_project(pb::CreateProjectRequest {
                            project: Some(p),
                            request_id: String::new(),
                        })
                        .await
                        .unwrap();
                    }
                    Route::List => {
                        c.list_projects(pb::ListProjectsRequest {
                            page_size: 50,
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                    }
                }
                lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                k += CONNECTIONS;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    figures(all, start.elapsed())
}

async fn run_edge(base: &str, t: &str, route: Route, names: Arc<Vec<String>>) -> Figures {
    let mut tasks = Vec::new();
    let start = Instant::now();
    for i in 0..CONNECTIONS {
        // One client (one keep-alive connection) per worker.
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .unwrap();
        let (names, base, t) = (names.clone(), base.to_owned(), t.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut k = i;
            while start.elapsed() < RUN {
                let t0 = Instant::now();
                let r = match route {
                    Route::Get => {
                        http.get(format!("{base}/v1/{}", names[k % names.len()]))
                            .bearer_auth(&t)
                            .send()
                            .await
                    }
                    Route::Create => {
                        http.post(format!("{base}/v1/projects"))
                            .bearer_auth(&t)
                            .json(&serde_json::json!({"displayName": format!("bench {k}")}))
                            .send()
                            .await
                    }
                    Route::List => {
                        http.get(format!("{base}/v1/projects?pageSize=50"))
                            .bearer_auth(&t)
                            .send()
                            .await
                    }
                }
                .unwrap();
                assert!(r.status().is_success(), "{}", r.status());
                let _ = r.bytes().await.unwrap();
                lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                k += CONNECTIONS;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    figures(all, start.elapsed())
}

#[tokio::main]
async fn main() {
    let server = start_server("edge", &[]);
    let t = token("bench", &[]);
    // 10,000 projects in the table.
    let mut fill = Vec::new();
    for w in 0..32 {
        let mut c =
            ProjectsServiceClient::with_interceptor(channel(&server.addr).await, Bearer(t.clone()));
        fill.push(tokio::spawn(async move {
            let mut names = Vec::new();
            for i in 0..10_000 / 32 + 1 {
                let p = pb::Project {
                    display_name: format!("seed {w}-{i}"),
                    ..Default::default()
                };
                names.push(
                    c.create_project(pb::CreateProjectRequest {
                        project: Some(p),
                        request_id: String::new(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .name,
                );
            }
            names
        }));
    }
    let mut names = Vec::new();
    for f in fill {
        names.extend(f.await.unwrap());
    }
    let names = Arc::new(names);
    println!(
        "HTTP/JSON edge vs native gRPC: {} projects, {CONNECTIONS} connections, median of {ROUNDS} alternating {}s runs, JWT verified per call\n",
        names.len(),
        RUN.as_secs()
    );
    println!(
        "{:<8} {:>12} {:>9} {:>9} {:>12} {:>9} {:>9} {:>11}",
        "route", "edge req/s", "p50 ms", "p99 ms", "grpc req/s", "p50 ms", "p99 ms", "edge/grpc"
    );
    for route in [Route::Get, Route::Create, Route::List] {
        // Alternating rounds, the median of each side: this shared machine drifts
        // between runs by more than the difference being measured.
        let (mut natives, mut edges) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            natives.push(run_native(&server.addr, &t, route, names.clone()).await);
            edges.push(run_edge(&server.addr, &t, route, names.clone()).await);
        }
        let (native, edge) = (median(natives), median(edges));
        println!(
            "{:<8} {:>12.0} {:>9.2} {:>9.2} {:>12.0} {:>9.2} {:>9.2} {:>10.0}%",
            format!("{route:?}"),
            edge.rps,
            edge.p50,
            edge.p99,
            native.rps,
            native.p50,
            native.p99,
            100.0 * edge.rps / native.rps
        );
    }
}
