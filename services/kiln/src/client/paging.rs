//! Listings: every List RPC pages the same way (`page_size`, `page_token`, `filter`,
//! `order_by` in; the items and `next_page_token` out), so one loop follows the pages of any.

use std::future::Future;

use clap::Args;

/// Items asked for per page.
pub(crate) const PAGE_SIZE: i32 = 200;

/// The flags every `kiln list` takes.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// AIP-160 filter, e.g. 'role = "admin"'.
    #[arg(long, default_value = "")]
    pub filter: String,
    /// e.g. "create_time desc".
    #[arg(long, default_value = "")]
    pub order_by: String,
    /// Stop after this many (default: all).
    #[arg(long)]
    pub limit: Option<usize>,
}

/// The paging fields of one request.
pub(crate) struct Page {
    pub(crate) size: i32,
    pub(crate) token: String,
    pub(crate) filter: String,
    pub(crate) order_by: String,
}

/// A List request: the paging fields can be set (`resource!` implements it).
pub(crate) trait PageRequest: Clone {
    fn set_page(&mut self, page: Page);
}

/// Lists everything `request` selects (up to `--limit`), following the pages: `call` sends
/// one request and answers with the page's items and the next page's token.
pub(crate) async fn list_all<Q, T, F, Fut>(
    list: &ListArgs,
    request: Q,
    mut call: F,
) -> anyhow::Result<Vec<T>>
where
    Q: PageRequest,
    F: FnMut(Q) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    collect_pages(list.limit, |token| {
        let mut request = request.clone();
        request.set_page(Page {
            size: PAGE_SIZE,
            token,
            filter: list.filter.clone(),
            order_by: list.order_by.clone(),
        });
        let reply = call(request);
        async move { Ok(reply.await?) }
    })
    .await
}

/// Follows `next_page_token` until the listing ends or `limit` items are in.
async fn collect_pages<T, F, Fut>(limit: Option<usize>, mut fetch: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = anyhow::Result<(Vec<T>, String)>>,
{
    let limit = limit.unwrap_or(usize::MAX);
    let mut items = Vec::new();
    let mut page_token = String::new();
    loop {
        let (page, next) = fetch(page_token).await?;
        items.extend(page);
        if next.is_empty() || items.len() >= limit {
            break;
        }
        page_token = next;
    }
    items.truncate(limit);
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of three items from 0 to `count`; returns the items and the tokens asked for.
    async fn list(count: usize, limit: Option<usize>) -> (Vec<usize>, Vec<String>) {
        let mut asked = Vec::new();
        let items = collect_pages(limit, |token| {
            asked.push(token.clone());
            let start: usize = token.parse().unwrap_or(0);
            let end = (start + 3).min(count);
            let next = if end < count {
                end.to_string()
            } else {
                String::new()
            };
            async move { Ok(((start..end).collect(), next)) }
        })
        .await
        .unwrap();
        (items, asked)
    }

    #[tokio::test]
    async fn pages_are_followed_to_the_end() {
        let (items, asked) = list(7, None).await;
        assert_eq!(items, (0..7).collect::<Vec<_>>());
        assert_eq!(asked, ["", "3", "6"]);
        let (items, asked) = list(0, None).await;
        assert!(items.is_empty());
        assert_eq!(asked, [""]);
    }

    #[tokio::test]
    async fn a_limit_stops_early_and_cuts_the_last_page() {
        let (items, asked) = list(100, Some(4)).await;
        assert_eq!(items, [0, 1, 2, 3]);
        assert_eq!(asked, ["", "3"]);
        let (items, asked) = list(100, Some(3)).await;
        assert_eq!(items, [0, 1, 2]);
        assert_eq!(asked, [""]);
    }
}
