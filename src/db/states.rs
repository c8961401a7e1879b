//! How the domain's state enums are stored: Postgres enum types (`job_state`,
//! `asset_state`) written and read as their lower-case labels. Kept here so
//! `domain/` knows nothing of diesel.
use diesel::{
    deserialize::{self, FromSql, Queryable},
    expression::AsExpression,
    pg::{Pg, PgValue},
    serialize::{self, IsNull, Output, ToSql},
};

use super::schema::sql_types::{AssetState as SqlAssetState, JobState as SqlJobState};
use crate::domain::{asset::AssetState, job::JobState};

/// Implements the column traits for a state enum with `as_str` and `parse`. The
/// `AsExpression` impl goes through a derived wrapper (`$bind`): diesel's own
/// bound-value type is only reachable through its derive.
macro_rules! pg_enum {
    ($state:ty, $sql:ty, $bind:ident, $label:literal) => {
        #[derive(Debug, diesel::expression::AsExpression)]
        #[diesel(sql_type = $sql)]
        pub struct $bind($state);

        impl ToSql<$sql, Pg> for $bind {
            fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
                ToSql::<$sql, Pg>::to_sql(&self.0, out)
            }
        }

        impl ToSql<$sql, Pg> for $state {
            fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
                use std::io::Write;
                out.write_all(self.as_str().as_bytes())?;
                Ok(IsNull::No)
            }
        }

        impl FromSql<$sql, Pg> for $state {
            fn from_sql(bytes: PgValue<'_>) -> deserialize::Result<Self> {
                let text = std::str::from_utf8(bytes.as_bytes())?;
                Self::parse(text)
                    .ok_or_else(|| format!(concat!("unknown ", $label, " {:?}"), text).into())
            }
        }

        impl AsExpression<$sql> for $state {
            type Expression = <$bind as AsExpression<$sql>>::Expression;

            fn as_expression(self) -> Self::Expression {
                AsExpression::<$sql>::as_expression($bind(self))
            }
        }

        impl<'a> AsExpression<$sql> for &'a $state {
            type Expression = <$bind as AsExpression<$sql>>::Expression;

            fn as_expression(self) -> Self::Expression {
                AsExpression::<$sql>::as_expression($bind(*self))
            }
        }

        impl Queryable<$sql, Pg> for $state {
            type Row = Self;

            fn build(row: Self) -> deserialize::Result<Self> {
                Ok(row)
            }
        }
    };
}

pg_enum!(JobState, SqlJobState, JobStateBind, "job_state");
pg_enum!(AssetState, SqlAssetState, AssetStateBind, "asset_state");
