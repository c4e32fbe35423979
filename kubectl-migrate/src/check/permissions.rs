//! Rules about the user's permissions: everything the migration does through the API, as RBAC
//! sees it, asked of the API server up front (SelfSubjectAccessReview).

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::{Api, Client};

use super::{Facts, Problem};

/// One permission the migration needs (see config/rbac.yaml).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    pub verb: &'static str,
    pub resource: &'static str,
    pub subresource: Option<&'static str>,
    /// None: cluster-wide.
    pub namespaced: bool,
}

/// Everything `kubectl migrate` does through the API, as RBAC sees it.
pub const NEEDED: [Permission; 11] = [
    Permission {
        verb: "get",
        resource: "pods",
        subresource: None,
        namespaced: true,
    },
    Permission {
        verb: "watch",
        resource: "pods",
        subresource: None,
        namespaced: true,
    },
    Permission {
        verb: "create",
        resource: "pods",
        subresource: None,
        namespaced: true,
    },
    Permission {
        verb: "delete",
        resource: "pods",
        subresource: None,
        namespaced: true,
    },
    Permission {
        verb: "patch",
        resource: "pods",
        subresource: None,
        namespaced: true,
    },
    Permission {
        verb: "create",
        resource: "pods",
        subresource: Some("exec"),
        namespaced: true,
    },
    Permission {
        verb: "patch",
        resource: "pods",
        subresource: Some("status"),
        namespaced: true,
    },
    Permission {
        verb: "get",
        resource: "persistentvolumeclaims",
        subresource: None,
        namespaced: true,
    },
    Permission {
        verb: "get",
        resource: "nodes",
        subresource: None,
        namespaced: false,
    },
    Permission {
        verb: "list",
        resource: "nodes",
        subresource: None,
        namespaced: false,
    },
    Permission {
        verb: "list",
        resource: "pods",
        subresource: None,
        namespaced: false,
    },
];

/// Asks the API server (SelfSubjectAccessReview) which of [`NEEDED`] the caller lacks.
///
/// # Errors
/// API errors.
pub async fn denied_permissions(
    client: &Client,
    namespace: &str,
) -> Result<Vec<Permission>, kube::Error> {
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut denied = Vec::new();
    for permission in NEEDED {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(permission.verb.into()),
                    resource: Some(permission.resource.into()),
                    subresource: permission.subresource.map(Into::into),
                    namespace: permission.namespaced.then(|| namespace.to_string()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let answer = reviews
            .create(&kube::api::PostParams::default(), &review)
            .await?;
        if !answer.status.is_some_and(|s| s.allowed) {
            denied.push(permission);
        }
    }
    Ok(denied)
}

/// The permissions the user lacks, as one problem.
pub fn denied(facts: &Facts) -> Option<Problem> {
    (!facts.denied.is_empty()).then(|| {
        problem(
            &facts.denied,
            facts.pod.metadata.namespace.as_deref().unwrap_or("default"),
        )
    })
}

/// One problem listing every missing permission as `verb resource` and where.
pub fn problem(denied: &[Permission], namespace: &str) -> Problem {
    let list: Vec<String> = denied
        .iter()
        .map(|p| {
            let resource = p.subresource.map_or_else(
                || p.resource.to_string(),
                |sub| format!("{}/{sub}", p.resource),
            );
            let scope = if p.namespaced {
                format!("in namespace {namespace}")
            } else {
                "cluster-wide".into()
            };
            format!("{} {resource} {scope}", p.verb)
        })
        .collect();
    Problem::new(
        format!("you are not allowed to: {}", list.join(", ")),
        "apply config/rbac.yaml in the namespace and bind its Role and ClusterRole to you (docs/security.md)",
    )
}

#[cfg(test)]
mod tests {
    use super::super::fixture::facts;
    use super::*;

    #[test]
    fn every_missing_permission_is_named_with_its_scope() {
        let mut f = facts();
        assert_eq!(denied(&f), None);
        f.denied = vec![NEEDED[3].clone(), NEEDED[5].clone(), NEEDED[8].clone()];
        let p = denied(&f).unwrap();
        assert_eq!(
            p.what,
            "you are not allowed to: delete pods in namespace apps, create pods/exec in namespace apps, get nodes cluster-wide"
        );
        assert!(p.fix.contains("config/rbac.yaml"));
    }
}
