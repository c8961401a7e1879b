//! AssetsService: the contract is complete; storage lands with the Assets issue.
//! Until then every RPC answers UNIMPLEMENTED (after authentication).
use crate::proto::v1::assets_service_server::AssetsService;

#[derive(Debug, Default)]
pub struct AssetsApi;

impl AssetsService for AssetsApi {}
