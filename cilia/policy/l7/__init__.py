"""L7 rule types: validation and matching for http, kafka, dns and l7proto parsers."""
