//! Any replica answers any query: the membership map ([`members`]), the fan-out that reads
//! every partition from its owner ([`router`]), and the client replicas ask each other with
//! ([`client`]). The Kafka side of membership is [`crate::kafka::members`].

pub mod client;
pub mod members;
pub mod router;
