"""The agent's transparent DNS proxy (issue 17): queries of endpoints whose egress policy has
``dns`` rules are redirected here by the BPF datapath, judged per name, forwarded to the server the
pod asked (allowed) or answered REFUSED (denied); allowed answers are learned before release.

``wire`` is the sans-I/O part (parse, build replies, read answers, TCP framing), ``policy`` decides
a query from a policy snapshot, ``server`` does the sockets.
"""
