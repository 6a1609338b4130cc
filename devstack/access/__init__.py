"""What each identity really touches on the local stack, recorded through proxies of its own, and compared with
the grants in infra/ (issue 31). See docs/identities.md."""
