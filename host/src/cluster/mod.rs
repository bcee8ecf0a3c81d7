//! Scale-out over Redis: the node registry ([`registry`]) — which nodes are alive, and
//! cleanup of the users of nodes that died — and the cross-node message bus ([`bus`]).
//! [`member`] runs this node's part; [`reconcile`] puts its users back when Redis lost them;
//! [`lb`] picks nodes for route logins; [`node_number`] leases this node's number in message ids.
//! Both share the key schema of [`crate::store::redis::RedisKeys`].

pub mod bus;
pub mod lb;
pub mod member;
pub mod node_number;
pub mod reconcile;
pub mod registry;

pub use bus::{Bus, BusDelivery, ClusterMessage, Inbound, Subscription};
pub use lb::{Balancer, Strategy};
pub use member::Cluster;
pub use registry::{NodeInfo, Registry};

#[cfg(test)]
pub(crate) mod tests;
