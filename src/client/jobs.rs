//! `mediaplane jobs create | list | watch`: a terminal client of JobsService.
use std::process::ExitCode;

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use crate::{
    client::ClientArgs,
    convert::json_to_struct,
    proto::v1::{self as pb, job::State},
};

#[derive(Debug, clap::Subcommand)]
pub enum JobsCommand {
    /// Queue a job and print its name (`--watch` follows it to the end).
    Create {
        #[command(flatten)]
        client: ClientArgs,
        /// Parent project, `projects/{id}`.
        #[arg(long)]
        project: String,
        #[arg(long)]
        kind: String,
        /// Input as a JSON object.
        #[arg(long, default_value = "{}")]
        input: String,
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// A job that must succeed first (`projects/p/jobs/j`); repeat for several.
        #[arg(long = "depends-on")]
        depends_on: Vec<String>,
        /// Run once the dependencies have ended, whatever their end.
        #[arg(long)]
        run_anyway: bool,
        /// Jobs of one kind take turns across keys (a customer, a project).
        #[arg(long, default_value = "")]
        concurrency_key: String,
        /// A label, KEY=VALUE; repeat for several.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Follow the job with a progress bar; exit code by final state.
        #[arg(long)]
        watch: bool,
    },
    /// List a project's jobs.
    List {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        project: String,
        /// `state = RUNNING AND kind = "render"`.
        #[arg(long, default_value = "")]
        filter: String,
    },
    /// Live progress of a job until it ends. Exit code: 0 SUCCEEDED, 3 FAILED, 4 CANCELLED.
    Watch {
        #[command(flatten)]
        client: ClientArgs,
        /// `projects/{p}/jobs/{j}`.
        name: String,
    },
}

fn state_name(state: i32) -> &'static str {
    match State::try_from(state).unwrap_or(State::Unspecified) {
        State::Unspecified => "UNKNOWN",
        State::Waiting => "WAITING",
        State::Queued => "QUEUED",
        State::Running => "RUNNING",
        State::Succeeded => "SUCCEEDED",
        State::Failed => "FAILED",
        State::Cancelled => "CANCELLED",
    }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?}: expected KEY=VALUE"))
}

pub async fn run(command: JobsCommand) -> anyhow::Result<ExitCode> {
    match command {
        JobsCommand::Create {
            client,
            project,
            kind,
            input,
            priority,
            depends_on,
            run_anyway,
            concurrency_key,
            labels,
            watch,
        } => {
            let input: serde_json::Value = serde_json::from_str(&input)
                .map_err(|e| anyhow::anyhow!("--input is not JSON: {e}"))?;
            let serde_json::Value::Object(input) = input else {
                anyhow::bail!("--input must be a JSON object");
            };
            let mut c = client.connect().await?;
            let job = pb::Job {
                kind,
                input: Some(json_to_struct(input)),
                priority,
                depends_on,
                run_anyway,
                concurrency_key,
                labels: labels.into_iter().collect(),
                ..Default::default()
            };
            let created = c
                .jobs
                .create_job(pb::CreateJobRequest {
                    parent: project,
                    job: Some(job),
                    request_id: uuid::Uuid::new_v4().to_string(),
                    ..Default::default()
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
                .into_inner();
            println!("{}", created.name);
            if watch {
                follow(&client, created.name).await
            } else {
                Ok(ExitCode::SUCCESS)
            }
        }
        JobsCommand::List {
            client,
            project,
            filter,
        } => {
            let mut c = client.connect().await?;
            let mut page_token = String::new();
            println!(
                "{:<80} {:<10} {:<12} {:>4}%  STEP",
                "NAME", "STATE", "KIND", ""
            );
            loop {
                let page = c
                    .jobs
                    .list_jobs(pb::ListJobsRequest {
                        parent: project.clone(),
                        page_size: 200,
                        page_token,
                        filter: filter.clone(),
                        order_by: String::new(),
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
                    .into_inner();
                for j in page.jobs {
                    println!(
                        "{:<80} {:<10} {:<12} {:>4}%  {}",
                        j.name,
                        state_name(j.state),
                        j.kind,
                        j.progress_percent,
                        j.current_step
                    );
                }
                if page.next_page_token.is_empty() {
                    return Ok(ExitCode::SUCCESS);
                }
                page_token = page.next_page_token;
            }
        }
        JobsCommand::Watch { client, name } => follow(&client, name).await,
    }
}

async fn follow(client: &ClientArgs, name: String) -> anyhow::Result<ExitCode> {
    let mut c = client.connect().await?;
    let mut last_seq = 0;
    let bar = ProgressBar::new(100);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix:10} [{bar:40}] {pos:>3}% {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    // Reconnect and resume after the last sequence seen if the stream breaks.
    loop {
        let stream = c
            .jobs
            .watch_job(pb::WatchJobRequest {
                name: name.clone(),
                after_sequence: last_seq,
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            Err(s) => anyhow::bail!("{}: {}", s.code(), s.message()),
        };
        let mut final_state = None;
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(e) => e,
                Err(s) if s.code() == tonic::Code::Unavailable => break,
                Err(s) => anyhow::bail!("{}: {}", s.code(), s.message()),
            };
            last_seq = event.sequence;
            let Some(job) = event.job else { continue };
            let state = state_name(job.state);
            bar.set_prefix(state);
            bar.set_position(job.progress_percent.clamp(0, 100) as u64);
            let text = [job.current_step.as_str(), job.message.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(" · ");
            bar.set_message(text.clone());
            if bar.is_hidden() {
                println!("{state} {}% {text}", job.progress_percent);
            }
            if matches!(
                State::try_from(job.state),
                Ok(State::Succeeded | State::Failed | State::Cancelled)
            ) {
                let detail = job
                    .error
                    .map(|e| format!(": {}", e.message))
                    .unwrap_or_default();
                final_state = Some((State::try_from(job.state).unwrap_or(State::Failed), detail));
            }
        }
        if let Some((state, detail)) = final_state {
            bar.finish_and_clear();
            println!("{name} {}{detail}", state_name(state as i32));
            return Ok(match state {
                State::Succeeded => ExitCode::SUCCESS,
                State::Cancelled => ExitCode::from(4),
                _ => ExitCode::from(3),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
