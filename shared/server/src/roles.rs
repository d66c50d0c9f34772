//! The services a process can run.

use std::fmt;
use std::str::FromStr;

/// One of Kiln's services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Identity,
    Registry,
    Scheduler,
    Billing,
    Inference,
    /// The HTTP edge (REST and OpenAI-style inference), transcoding to the gRPC API.
    Gateway,
}

impl Role {
    /// Every service, in the order a process starts them (each after those it calls).
    pub const ALL: [Role; 6] = [
        Role::Identity,
        Role::Registry,
        Role::Billing,
        Role::Scheduler,
        Role::Inference,
        Role::Gateway,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Identity => "identity",
            Role::Registry => "registry",
            Role::Scheduler => "scheduler",
            Role::Billing => "billing",
            Role::Inference => "inference",
            Role::Gateway => "gateway",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Role::ALL.iter().map(|r| r.name()).collect();
                format!("unknown service {name:?}; services: {}", names.join(", "))
            })
    }
}

/// The set of services one process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Roles(u8);

impl Roles {
    pub fn all() -> Self {
        Role::ALL.into_iter().collect()
    }

    pub fn has(self, role: Role) -> bool {
        self.0 & (1 << role as u8) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Role> {
        Role::ALL.into_iter().filter(move |r| self.has(*r))
    }
}

impl FromIterator<Role> for Roles {
    fn from_iter<I: IntoIterator<Item = Role>>(roles: I) -> Self {
        Roles(roles.into_iter().fold(0, |bits, r| bits | (1 << r as u8)))
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Role::name).collect();
        f.write_str(&names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_ones_list_the_services() {
        assert_eq!("billing".parse::<Role>().unwrap(), Role::Billing);
        let err = "billng".parse::<Role>().unwrap_err();
        assert!(
            err.contains("\"billng\"") && err.contains("inference"),
            "{err}"
        );
    }

    #[test]
    fn a_set_holds_what_it_was_given() {
        let roles: Roles = [Role::Registry, Role::Inference].into_iter().collect();
        assert!(roles.has(Role::Registry) && roles.has(Role::Inference));
        assert!(!roles.has(Role::Identity) && !roles.has(Role::Billing));
        assert_eq!(roles.to_string(), "registry, inference");
        assert!(Roles::default().is_empty());
        assert_eq!(Roles::all().iter().count(), 6);
    }
}
