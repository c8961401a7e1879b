//! Hand-written statements (`db::Statement`) are prepared once per connection and
//! SQL text: one whose SQL varies with its input never runs another text's plan.
use diesel::{QueryResult, query_builder::AstPass, sql_types::Integer};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use mediaplane::db::{Prepared, Statement};

use crate::helpers::PG_ADMIN_URL;

/// `SELECT n` or `SELECT n * 2`: two texts from one type.
struct Scaled {
    n: i32,
    twice: bool,
}

impl Statement for Scaled {
    fn walk<'b>(&'b self, mut out: AstPass<'_, 'b, diesel::pg::Pg>) -> QueryResult<()> {
        out.push_sql("SELECT ");
        out.push_bind_param::<Integer, _>(&self.n)?;
        if self.twice {
            out.push_sql(" * 2");
        }
        out.push_sql(" AS v");
        Ok(())
    }
}

#[derive(diesel::QueryableByName)]
struct Value {
    #[diesel(sql_type = Integer)]
    v: i32,
}

#[tokio::test]
async fn a_statement_whose_sql_varies_runs_its_own_sql() {
    let mut conn = AsyncPgConnection::establish(PG_ADMIN_URL).await.unwrap();
    let mut seen = Vec::new();
    for twice in [false, true, false, true] {
        let row: Value = Prepared(Scaled { n: 21, twice })
            .get_result(&mut conn)
            .await
            .unwrap();
        seen.push(row.v);
    }
    assert_eq!(seen, [21, 42, 21, 42]);
}
