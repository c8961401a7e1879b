//! One integration binary (link once): every test starts the real server on port 0
//! against its own Postgres database and talks to it over a real socket.
mod access;
mod assets;
mod browser;
mod deploy;
mod edge;
mod health;
mod helpers;
mod hostile;
mod interop;
mod jobs;
mod lifecycle;
mod limits;
mod metrics;
mod pipelines;
mod projects;
mod properties;
mod queues;
mod readme;
mod statements;
mod studio;
mod traces;
mod transports;
mod worker;
