// cilia's datapath: L3/L4 policy per endpoint, connection tracking, redirect to Envoy.
//
// One program pair serves every endpoint, attached to the host end of its veth:
//   from_endpoint  tc ingress  packets the endpoint sends
//   to_endpoint    tc egress   packets about to enter the endpoint
// A new flow between two local endpoints is judged once, where it enters the node (the
// sender's egress policy, then the receiver's ingress policy); its conntrack entry lets the
// rest of the flow and its replies through on both sides. Flows from the node itself or
// elsewhere are judged against the receiver's ingress policy at to_endpoint. Other nodes and
// outside hosts (direct routing or the VXLAN tunnel) come in through the programs at the end of
// this file, which also hand their L7 flows to Envoy.
//
// Maps shared across programs and agent restarts are pinned under PIN_DIR (set by the loader).
// Policy maps are per endpoint (LPM tries made and pinned by the agent, like Cilium's
// cilium_policy_<EPID>), found through the policy_maps array by endpoint id.
//
// Services (lb_datapath.h): a packet to a service frontend is DNATed to a backend at
// from_endpoint *before* conntrack and policy, so policy judges the backend; replies get the
// frontend back as their source at to_endpoint (and at to_netdev for NodePort from outside).
//
// Keep the structs in step with cilia/bpf/maps.py and cilia/bpf/policykey.py.

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/pkt_cls.h>

#define MARK_MAGIC_MASK 0x0F00
#define MARK_TO_PROXY 0x0200      // set on redirected packets; a routing rule delivers them locally
#define MARK_PROXY_INGRESS 0x0A00 // Envoy's upstream connections (SO_MARK), already judged by Envoy
#define MARK_PROXY_EGRESS 0x0B00
#define MARK_MAGIC_IDENTITY 0x0F00 // from the tunnel: the sender's identity (from the VNI) in bits 16-31
#define MARK_BOUNCE_TO_PROXY 0x0E00 // sent back in at the veth's ingress to reach Envoy (port in bits 16-31)

#define EVENT_DROP 1
#define EVENT_TRACE 4
#define EVENT_VERDICT 5

// Trace events carry their observation point in the reason field.
#define OBS_FROM_ENDPOINT 1 // passed on leaving an endpoint
#define OBS_TO_ENDPOINT 2   // passed on entering an endpoint
#define OBS_TO_PROXY 3      // handed to Envoy

#define REASON_POLICY_DENIED 133 // no entry allows it (Cilium's DROP_POLICY)
#define REASON_POLICY_DENY 181   // a deny entry (Cilium's DROP_POLICY_DENY)
#define REASON_INVALID_SOURCE 132
#define REASON_UNKNOWN_L3 142    // not IPv4: fail closed
#define REASON_NO_PROXY 180      // needs L7 but no proxy listener (or cannot redirect here)

#define VERDICT_FORWARDED 1
#define VERDICT_DROPPED 2
#define VERDICT_AUDIT 4       // would have been dropped; the endpoint is in audit mode
#define VERDICT_REDIRECTED 5

// endpoint_val.flags: audit mode per direction of the endpoint's own policy
#define EP_AUDIT_INGRESS 1
#define EP_AUDIT_EGRESS 2

#define IDENTITY_HOST 1
#define IDENTITY_REMOTE_NODE 6
#define IDENTITY_WORLD_IPV4 9

#define POLICY_DENY 1

struct ipcache_key {
    u32 prefixlen;
    u32 addr; // network order
};

struct ipcache_val {
    u32 identity;
};

struct endpoint_val {
    u32 ep_id;     // index in policy_maps
    u32 ifindex;   // host end of its veth
    u32 identity;
    u32 flags;     // EP_AUDIT_*
};

struct policy_key {
    u32 prefixlen;
    u32 identity;  // network order (always matched whole)
    u8 egress;
    u8 protocol;
    u16 dport;     // network order
};

struct policy_val {
    u16 proxy_port;
    u8 flags;
    u8 pad;
    u32 rule_id;
    u64 packets;
    u64 bytes;
};

struct ct_key {
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u8 protocol;
    u8 pad[3];
};

struct ct_val {
    u16 proxy_port; // the flow goes to Envoy on this port
    u8 flags;
    u8 pad;
    u32 src_identity;
    u64 packets;
    u64 bytes;
    u64 last_seen;
};

struct event {
    u8 type;
    u8 verdict;
    u8 egress;     // which policy decided: 1 the sender's egress, 0 the receiver's ingress
    u8 protocol;
    u16 reason;
    u16 proxy_port;
    u32 ep_id;     // endpoint whose policy decided
    u32 src_identity;
    u32 dst_identity;
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u32 rule_id;
    u32 ifindex;
    u32 len;
    u32 svc_addr;  // a service flow: the frontend the sender addressed (daddr/dport: the backend)
    u16 svc_port;
    u16 pad;
    u32 svc_id;
};

BPF_TABLE_PINNED7("lpm_trie", struct ipcache_key, struct ipcache_val, ipcache, 65536,
                  PIN_DIR "/ipcache", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", u32, struct endpoint_val, endpoints, 4096, PIN_DIR "/endpoints");
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_val, conntrack, 262144, PIN_DIR "/conntrack");
BPF_TABLE_PINNED("array", u32, u64, drop_counts, 256, PIN_DIR "/drop_counts");
// Template for the per-endpoint policy tries (never used directly).
BPF_F_TABLE("lpm_trie", struct policy_key, struct policy_val, policy_template, POLICY_MAX, BPF_F_NO_PREALLOC);
BPF_ARRAY_OF_MAPS(policy_maps, "policy_template", 4096);
BPF_PERF_OUTPUT(events);
// config[0] != 0: emit a trace event for every packet passed (`cilia monitor -t trace` turns it
// on for as long as someone watches). config[1] != 0: --allow-localhost always (the node itself
// reaches every endpoint whatever its policy). Not pinned: the agent sets them at every load.
BPF_ARRAY(config, u32, 4);
#define CONFIG_TRACE 0
#define CONFIG_ALLOW_LOCALHOST 1

struct flow {
    u32 saddr, daddr;
    u16 sport, dport;   // network order; for ICMP dport holds the type, sport the echo id
    u8 protocol;
    u8 icmp_reply;      // an ICMP echo reply: its flow is the request's, reversed
    u8 syn;             // a TCP SYN without ACK: a new connection, whatever conntrack remembers
    u32 len;
    u32 svc_addr;       // set by the load balancer: the service frontend before DNAT
    u16 svc_port;
    u32 svc_id;
};

static __always_inline int parse(struct __sk_buff *skb, struct flow *f) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return -1;
    if (eth->h_proto != bpf_htons(ETH_P_IP))
        return eth->h_proto == bpf_htons(ETH_P_ARP) ? 1 : -2;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->ihl < 5)
        return -1;
    f->saddr = ip->saddr;
    f->daddr = ip->daddr;
    f->protocol = ip->protocol;
    f->sport = 0;
    f->dport = 0;
    f->icmp_reply = 0;
    f->syn = 0;
    f->len = skb->len;
    void *l4 = (void *)ip + ip->ihl * 4;
    if (ip->frag_off & bpf_htons(0x1FFF))
        return 0; // a later fragment: no L4 header; judged on ports 0
    if (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP || ip->protocol == IPPROTO_SCTP) {
        u16 *ports = l4;
        if ((void *)(ports + 2) > end)
            return -1;
        f->sport = ports[0];
        f->dport = ports[1];
        if (ip->protocol == IPPROTO_TCP) {
            struct tcphdr *tcp = l4;
            if ((void *)(tcp + 1) > end)
                return -1;
            f->syn = tcp->syn && !tcp->ack;
        }
    } else if (ip->protocol == IPPROTO_ICMP) {
        struct icmphdr *icmp = l4;
        if ((void *)(icmp + 1) > end)
            return -1;
        f->dport = bpf_htons(icmp->type);
        if (icmp->type == ICMP_ECHO || icmp->type == ICMP_ECHOREPLY)
            f->sport = icmp->un.echo.id;
        f->icmp_reply = icmp->type == ICMP_ECHOREPLY;
    }
    return 0;
}

static __always_inline void ct_keys(struct flow *f, struct ct_key *fwd, struct ct_key *rev) {
    __builtin_memset(fwd, 0, sizeof(*fwd));
    __builtin_memset(rev, 0, sizeof(*rev));
    fwd->saddr = f->saddr; fwd->daddr = f->daddr; fwd->protocol = f->protocol;
    rev->saddr = f->daddr; rev->daddr = f->saddr; rev->protocol = f->protocol;
    if (f->protocol == IPPROTO_ICMP) {
        // Echo request and reply share one entry keyed (requester, responder, id, 0).
        fwd->sport = f->sport; rev->sport = f->sport;
    } else {
        fwd->sport = f->sport; fwd->dport = f->dport;
        rev->sport = f->dport; rev->dport = f->sport;
    }
}

static __always_inline u32 identity_of(u32 addr) {
    struct ipcache_key k = {.prefixlen = 32, .addr = addr};
    struct ipcache_val *v = ipcache.lookup(&k);
    return v ? v->identity : IDENTITY_WORLD_IPV4;
}

// The endpoint's decision for a peer: NULL = no entry (dropped). Exact identity first, then ANY:
// the agent writes the map so that this equals `cilia policy trace` (see policykey.py).
static __always_inline struct policy_val *policy_lookup(u32 ep_id, u32 peer, u8 egress, struct flow *f) {
    void *map = policy_maps.lookup(&ep_id);
    if (!map)
        return NULL;
    struct policy_key k = {.prefixlen = 64, .identity = bpf_htonl(peer), .egress = egress,
                           .protocol = f->protocol, .dport = f->dport};
    struct policy_val *v = bpf_map_lookup_elem(map, &k);
    if (v)
        return v;
    k.identity = 0;
    return bpf_map_lookup_elem(map, &k);
}

static __always_inline void emit_raw(struct __sk_buff *skb, struct flow *f, u8 type, u8 verdict, u8 egress,
                                     u16 reason, u32 ep_id, u32 src_id, u32 dst_id, u16 proxy_port, u32 rule_id) {
    struct event e = {};
    e.type = type;
    e.verdict = verdict;
    e.egress = egress;
    e.protocol = f->protocol;
    e.reason = reason;
    e.proxy_port = proxy_port;
    e.ep_id = ep_id;
    e.src_identity = src_id;
    e.dst_identity = dst_id;
    e.saddr = f->saddr;
    e.daddr = f->daddr;
    e.sport = f->sport;
    e.dport = f->dport;
    e.rule_id = rule_id;
    e.ifindex = skb->ifindex;
    e.len = f->len;
    e.svc_addr = f->svc_addr;
    e.svc_port = f->svc_port;
    e.svc_id = f->svc_id;
    events.perf_submit(skb, &e, sizeof(e));
}

static __always_inline void emit(struct __sk_buff *skb, struct flow *f, u8 type, u8 verdict, u8 egress,
                                 u16 reason, u32 ep_id, u32 src_id, u32 dst_id, struct policy_val *pv) {
    emit_raw(skb, f, type, verdict, egress, reason, ep_id, src_id, dst_id, pv ? pv->proxy_port : 0,
             pv ? pv->rule_id : 0);
}

static __always_inline void trace(struct __sk_buff *skb, struct flow *f, u16 obs, u8 verdict, u32 src_id,
                                  u32 dst_id, u16 proxy_port) {
    u32 idx = 0;
    u32 *on = config.lookup(&idx); // CONFIG_TRACE
    if (!on || !*on)
        return;
    // An identity of 0 is looked up here, so a packet pays for it only while tracing.
    if (!src_id)
        src_id = identity_of(f->saddr);
    if (!dst_id)
        dst_id = identity_of(f->daddr);
    struct endpoint_val *ep = endpoints.lookup(obs == OBS_TO_ENDPOINT ? &f->daddr : &f->saddr);
    emit_raw(skb, f, EVENT_TRACE, verdict, 0, obs, ep ? ep->ep_id : 0, src_id, dst_id, proxy_port, 0);
}

static __always_inline int drop(struct __sk_buff *skb, struct flow *f, u8 egress, u16 reason, u32 ep_id,
                                u32 src_id, u32 dst_id, struct policy_val *pv) {
    u32 idx = reason;
    u64 *n = drop_counts.lookup(&idx);
    if (n)
        __sync_fetch_and_add(n, 1);
    emit(skb, f, EVENT_DROP, VERDICT_DROPPED, egress, reason, ep_id, src_id, dst_id, pv);
    return TC_ACT_SHOT;
}

static __always_inline void count(struct policy_val *pv, struct flow *f) {
    __sync_fetch_and_add(&pv->packets, 1);
    __sync_fetch_and_add(&pv->bytes, f->len);
}

// Hand the packet to the transparent proxy socket on proxy_port. TCP (Envoy, the DNS proxy): the
// flow's own accepted socket if there is one, else the listener (a SYN becomes a new proxied
// connection; anything else is answered with a reset, which is how connections that predate an
// L7 rule are made to reconnect). UDP (the DNS proxy): its one socket, which reads the original
// destination with IP_ORIGDSTADDR.
static __always_inline int to_proxy(struct __sk_buff *skb, struct flow *f, u16 proxy_port) {
    struct bpf_sock_tuple t = {};
    t.ipv4.saddr = f->saddr;
    t.ipv4.daddr = f->daddr;
    t.ipv4.sport = f->sport;
    t.ipv4.dport = f->dport;
    struct bpf_sock *sk;
    if (f->protocol == IPPROTO_UDP) {
        t.ipv4.daddr = bpf_htonl(0x7f000001);
        t.ipv4.dport = bpf_htons(proxy_port);
        sk = bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
        if (!sk)
            return -1;
        goto assign;
    }
    if (f->protocol != IPPROTO_TCP)
        return -1;
    sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        if (sk->state != BPF_TCP_LISTEN)
            goto assign;
        bpf_sk_release(sk);
    }
    t.ipv4.daddr = bpf_htonl(0x7f000001);
    t.ipv4.dport = bpf_htons(proxy_port);
    sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return -1;
assign:;
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (err)
        return -1;
    skb->mark = MARK_TO_PROXY;
    return 0;
}

// to_endpoint runs at tc egress, where bpf_sk_assign cannot deliver to a local socket: a flow
// from the node itself (or any other way than the devices that redirect on arrival) to an L7
// port is sent back in at the ingress of the same veth, marked with the proxy port, and
// from_endpoint assigns it to Envoy there. The mark never crosses into a pod: veth scrubs it
// between namespaces, so no endpoint can forge it.
static __always_inline int bounce_to_proxy(struct __sk_buff *skb, u16 proxy_port) {
    skb->mark = MARK_BOUNCE_TO_PROXY | ((u32)proxy_port << 16);
    return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}

static __always_inline int established(struct __sk_buff *skb, struct flow *f, int at_source) {
    struct ct_key fwd, rev;
    ct_keys(f, &fwd, &rev);
    // A SYN opens a new connection even on a reused 4-tuple: it is judged by today's policy,
    // never let through on an old connection's entry. (At to_endpoint, a SYN from a local
    // endpoint was judged a moment ago by from_endpoint, which made the entry.)
    if (f->syn && (at_source || !endpoints.lookup(&f->saddr))) {
        conntrack.delete(&fwd);
        return -1;
    }
    struct ct_val *ct = f->icmp_reply ? NULL : conntrack.lookup(&fwd);
    if (ct) {
        __sync_fetch_and_add(&ct->packets, 1);
        __sync_fetch_and_add(&ct->bytes, f->len);
        ct->last_seen = bpf_ktime_get_ns();
        if (ct->proxy_port) {
            // The flow goes through Envoy. Where it enters from an endpoint, hand it over; where
            // it arrives from elsewhere it cannot be redirected (an established flow that became
            // subject to L7 policy after it began): drop, as a new one would be.
            if (!at_source && f->protocol == IPPROTO_TCP)
                return bounce_to_proxy(skb, ct->proxy_port);
            if (!at_source || to_proxy(skb, f, ct->proxy_port) < 0)
                return drop(skb, f, at_source, REASON_NO_PROXY, 0, ct->src_identity, 0, NULL);
            trace(skb, f, OBS_TO_PROXY, VERDICT_REDIRECTED, ct->src_identity, 0, ct->proxy_port);
            return TC_ACT_OK;
        }
        trace(skb, f, at_source ? OBS_FROM_ENDPOINT : OBS_TO_ENDPOINT, VERDICT_FORWARDED, ct->src_identity, 0, 0);
        return TC_ACT_OK;
    }
    ct = conntrack.lookup(&rev);
    if (ct) {
        __sync_fetch_and_add(&ct->packets, 1);
        __sync_fetch_and_add(&ct->bytes, f->len);
        ct->last_seen = bpf_ktime_get_ns();
        trace(skb, f, at_source ? OBS_FROM_ENDPOINT : OBS_TO_ENDPOINT, VERDICT_FORWARDED, 0, ct->src_identity, 0);
        return TC_ACT_OK;
    }
    return -1;
}

#include "lb_datapath.h"

static __always_inline void ct_create(struct flow *f, u32 src_id, u16 proxy_port) {
    struct ct_key fwd, rev;
    ct_keys(f, &fwd, &rev);
    struct ct_val v = {.proxy_port = proxy_port, .src_identity = src_id, .packets = 1,
                       .bytes = f->len, .last_seen = bpf_ktime_get_ns()};
    conntrack.update(&fwd, &v);
}

// --allow-localhost always: the node itself (kubelet-style probes) is let in at L3, so an L7 port
// is allow-all for it too (Cilium's meaning); with `policy` the host is judged like any peer.
static __always_inline int allow_localhost(void) {
    u32 idx = CONFIG_ALLOW_LOCALHOST;
    u32 *on = config.lookup(&idx);
    return on && *on;
}

static __always_inline int allow_host(struct __sk_buff *skb, struct flow *f, struct endpoint_val *dst) {
    ct_create(f, IDENTITY_HOST, 0);
    emit_raw(skb, f, EVENT_VERDICT, VERDICT_FORWARDED, 0, 0, dst->ep_id, IDENTITY_HOST, dst->identity, 0, 0);
    return TC_ACT_OK;
}

int from_endpoint(struct __sk_buff *skb) {
    struct flow f = {};
    int p = parse(skb, &f);
    if (p == 1)
        return TC_ACT_OK; // ARP
    if (p < 0) {
        struct flow none = {.len = skb->len};
        return drop(skb, &none, 1, REASON_UNKNOWN_L3, 0, 0, 0, NULL);
    }
    if ((skb->mark & MARK_MAGIC_MASK) == MARK_BOUNCE_TO_PROXY) {
        // Judged at to_endpoint (see bounce_to_proxy). The frame is addressed to the endpoint:
        // take it as this node's, so the proxy route delivers it to Envoy.
        u16 port = skb->mark >> 16;
        bpf_skb_change_type(skb, 0 /* PACKET_HOST */);
        if (to_proxy(skb, &f, port) < 0)
            return drop(skb, &f, 0, REASON_NO_PROXY, 0, 0, 0, NULL);
        trace(skb, &f, OBS_TO_PROXY, VERDICT_REDIRECTED, 0, 0, port);
        return TC_ACT_OK;
    }
    struct endpoint_val *src = endpoints.lookup(&f.saddr);
    if (!src || src->ifindex != skb->ifindex)
        return drop(skb, &f, 1, REASON_INVALID_SOURCE, 0, 0, 0, NULL);
    // Service frontend -> backend first: everything below sees (and judges) the backend.
    int lb_reason = lb_nat(skb, &f, 0);
    if (lb_reason)
        return drop(skb, &f, 1, lb_reason, src->ep_id, src->identity, 0, NULL);
    int r = established(skb, &f, 1);
    if (r >= 0)
        return r;
    lb_forget(&f);
    u32 src_id = src->identity;
    u32 dst_id = identity_of(f.daddr);
    u16 proxy_port = 0;
    // A policy drop by an endpoint in audit mode is let through and reported as AUDIT instead.
    u16 audit_reason = 0;
    u8 audit_egress = 0;
    u32 audit_ep = 0;
    struct policy_val *audit_pv = NULL;

    struct policy_val *pv = policy_lookup(src->ep_id, dst_id, 1, &f);
    if (!pv || (pv->flags & POLICY_DENY)) {
        u16 reason = pv ? REASON_POLICY_DENY : REASON_POLICY_DENIED;
        if (!(src->flags & EP_AUDIT_EGRESS))
            return drop(skb, &f, 1, reason, src->ep_id, src_id, dst_id, pv);
        audit_reason = reason;
        audit_egress = 1;
        audit_ep = src->ep_id;
        audit_pv = pv;
        pv = NULL;
    } else {
        count(pv, &f);
        proxy_port = pv->proxy_port;
    }
    u8 decided_egress = 1;
    u32 decided_ep = src->ep_id;
    struct policy_val *decided = pv;

    struct endpoint_val *dst = endpoints.lookup(&f.daddr);
    if (dst) {
        struct policy_val *iv = policy_lookup(dst->ep_id, src_id, 0, &f);
        if (!iv || (iv->flags & POLICY_DENY)) {
            u16 reason = iv ? REASON_POLICY_DENY : REASON_POLICY_DENIED;
            if (!(dst->flags & EP_AUDIT_INGRESS))
                return drop(skb, &f, 0, reason, dst->ep_id, src_id, dst_id, iv);
            if (!audit_reason) {
                audit_reason = reason;
                audit_egress = 0;
                audit_ep = dst->ep_id;
                audit_pv = iv;
            }
        } else {
            count(iv, &f);
            // The sender's L7 proxy goes first; otherwise the receiver's policy has the last word.
            if (!proxy_port) {
                proxy_port = iv->proxy_port;
                decided_egress = 0;
                decided_ep = dst->ep_id;
                decided = iv;
            }
        }
    }
    if (proxy_port) {
        if (to_proxy(skb, &f, proxy_port) < 0)
            return drop(skb, &f, decided_egress, REASON_NO_PROXY, decided_ep, src_id, dst_id, decided);
    }
    ct_create(&f, src_id, proxy_port);
    if (audit_reason)
        emit(skb, &f, EVENT_VERDICT, VERDICT_AUDIT, audit_egress, audit_reason, audit_ep, src_id, dst_id, audit_pv);
    else
        emit(skb, &f, EVENT_VERDICT, proxy_port ? VERDICT_REDIRECTED : VERDICT_FORWARDED, decided_egress, 0,
             decided_ep, src_id, dst_id, decided);
    return TC_ACT_OK;
}

static __always_inline int to_endpoint_policy(struct __sk_buff *skb, struct flow *fp) {
    struct flow f = {};
    int p = parse(skb, &f);
    *fp = f;
    if (p == 1)
        return TC_ACT_OK;
    if (p < 0) {
        struct flow none = {.len = skb->len};
        return drop(skb, &none, 0, REASON_UNKNOWN_L3, 0, 0, 0, NULL);
    }
    int r = established(skb, &f, 0);
    if (r >= 0)
        return r;
    struct endpoint_val *dst = endpoints.lookup(&f.daddr);
    if (!dst)
        return TC_ACT_OK; // not for an endpoint we manage (its own policy is elsewhere)
    u32 src_id = identity_of(f.saddr);
    u32 mark = skb->mark & MARK_MAGIC_MASK;
    if (mark == MARK_PROXY_INGRESS) {
        // Envoy's upstream connection for an ingress L7 port: Envoy enforced this endpoint's
        // policy.
        ct_create(&f, IDENTITY_HOST, 0);
        return TC_ACT_OK;
    }
    if (mark == MARK_PROXY_EGRESS && (skb->mark >> 16))
        // An egress proxy's upstream on behalf of the endpoint whose identity the mark carries
        // (Cilium's scheme): the receiver's ingress policy judges that identity, not the node.
        // If the receiver's port needs L7 as well, it cannot be redirected here: dropped below.
        src_id = skb->mark >> 16;
    if (mark == MARK_MAGIC_IDENTITY)
        src_id = skb->mark >> 16; // arrived through the tunnel: the identity the sender put in the VNI
    if (src_id == IDENTITY_HOST && allow_localhost())
        return allow_host(skb, &f, dst);
    struct policy_val *iv = policy_lookup(dst->ep_id, src_id, 0, &f);
    if (!iv || (iv->flags & POLICY_DENY)) {
        u16 reason = iv ? REASON_POLICY_DENY : REASON_POLICY_DENIED;
        if (!(dst->flags & EP_AUDIT_INGRESS))
            return drop(skb, &f, 0, reason, dst->ep_id, src_id, dst->identity, iv);
        ct_create(&f, src_id, 0);
        emit(skb, &f, EVENT_VERDICT, VERDICT_AUDIT, 0, reason, dst->ep_id, src_id, dst->identity, iv);
        return TC_ACT_OK;
    }
    if (iv->proxy_port) {
        // Needs L7 and did not come through a device that redirects on arrival (the node itself,
        // mostly): bounced to the veth's ingress, where from_endpoint hands it to Envoy.
        if (f.protocol != IPPROTO_TCP)
            return drop(skb, &f, 0, REASON_NO_PROXY, dst->ep_id, src_id, dst->identity, iv);
        count(iv, &f);
        ct_create(&f, src_id, iv->proxy_port);
        emit(skb, &f, EVENT_VERDICT, VERDICT_REDIRECTED, 0, 0, dst->ep_id, src_id, dst->identity, iv);
        return bounce_to_proxy(skb, iv->proxy_port);
    }
    count(iv, &f);
    ct_create(&f, src_id, 0);
    emit(skb, &f, EVENT_VERDICT, VERDICT_FORWARDED, 0, 0, dst->ep_id, src_id, dst->identity, iv);
    return TC_ACT_OK;
}

int to_endpoint(struct __sk_buff *skb) {
    struct flow f = {};
    int r = to_endpoint_policy(skb, &f);
    if (r == TC_ACT_OK)
        lb_rev_nat(skb, &f); // a service backend's reply: from the frontend the client addressed
    return r;
}

// ---- Cross-node traffic (issue 13) ---------------------------------------------------------
//
// Packets from other nodes, outside hosts and the tunnel are judged where they enter the node:
//   from_network  tc ingress of the node's underlay device (direct routing, outside hosts)
//   from_overlay  tc ingress of the VXLAN device (external/collect-metadata mode)
//   to_overlay    tc egress of the VXLAN device
// The sender's egress policy was judged by from_endpoint on its own node; the receiver's ingress
// policy is judged here or at to_endpoint, with the peer's identity from the ipcache (direct
// routing: the kvstore fills it with every node's endpoints; other nodes' addresses are
// remote-node) or from the tunnel (the VNI carries the sender's identity, as in Cilium: the
// receiver enforces on that, not on the source address).
//
// Why L7 redirection happens here and not at to_endpoint: to_endpoint runs at tc egress of the
// endpoint's host-side veth, after routing, where bpf_sk_assign cannot hand a packet to a local
// socket. At tc ingress of the device the packet arrived on, it can: a new TCP flow to a port
// with L7 rules is assigned to Envoy's transparent listener and marked MARK_TO_PROXY, and the
// proxy route delivers it locally (Cilium does the same in bpf_host/bpf_overlay). Its conntrack
// entry names the proxy port, so the rest of the flow follows; everything else passes on to
// to_endpoint, which judges L3/L4 as for any flow that did not start at a local endpoint.
// Traffic from the node itself to an L7 port has no ingress device to be redirected at: with
// --allow-localhost always it is let in at L3 (so L7 is allow-all for it, as in Cilium), else
// to_endpoint judges it and bounces it to the veth's ingress for Envoy (bounce_to_proxy).

// Other nodes' pod prefixes -> their node IP (network order): where to_overlay tunnels to.
struct tunnel_val {
    u32 node_ip;
};
BPF_TABLE_PINNED7("lpm_trie", struct ipcache_key, struct tunnel_val, tunnels, 4096,
                  PIN_DIR "/tunnels", BPF_F_NO_PREALLOC);

// A packet for a local endpoint from elsewhere: a new TCP flow to an L7 port goes to Envoy now,
// an established one that goes through Envoy follows it; the rest is left to to_endpoint.
static __always_inline int ingress_redirect(struct __sk_buff *skb, struct flow *f, u32 src_id) {
    if (f->protocol != IPPROTO_TCP)
        return TC_ACT_OK;
    struct endpoint_val *dst = endpoints.lookup(&f->daddr);
    if (!dst)
        return TC_ACT_OK;
    struct ct_key fwd, rev;
    ct_keys(f, &fwd, &rev);
    if (!f->syn) {
        struct ct_val *ct = conntrack.lookup(&fwd);
        if (ct && ct->proxy_port) {
            __sync_fetch_and_add(&ct->packets, 1);
            __sync_fetch_and_add(&ct->bytes, f->len);
            ct->last_seen = bpf_ktime_get_ns();
            if (to_proxy(skb, f, ct->proxy_port) < 0)
                return drop(skb, f, 0, REASON_NO_PROXY, dst->ep_id, ct->src_identity, dst->identity, NULL);
            trace(skb, f, OBS_TO_PROXY, VERDICT_REDIRECTED, ct->src_identity, dst->identity, ct->proxy_port);
            return TC_ACT_OK;
        }
        return TC_ACT_OK; // established without L7, a reply, or not allowed: to_endpoint decides
    }
    if (src_id == IDENTITY_HOST && allow_localhost())
        return TC_ACT_OK;
    struct policy_val *iv = policy_lookup(dst->ep_id, src_id, 0, f);
    if (!iv || (iv->flags & POLICY_DENY) || !iv->proxy_port)
        return TC_ACT_OK; // dropped or forwarded at to_endpoint, which reports it
    if (to_proxy(skb, f, iv->proxy_port) < 0)
        return drop(skb, f, 0, REASON_NO_PROXY, dst->ep_id, src_id, dst->identity, iv);
    count(iv, f);
    ct_create(f, src_id, iv->proxy_port);
    emit(skb, f, EVENT_VERDICT, VERDICT_REDIRECTED, 0, 0, dst->ep_id, src_id, dst->identity, iv);
    return TC_ACT_OK;
}

// On the underlay it takes from_netdev's place (one ingress filter per device): NodePort first,
// then the flow, now addressed to its backend, as any other from the network.
int from_network(struct __sk_buff *skb) {
    struct flow f = {};
    if (parse(skb, &f) != 0)
        return TC_ACT_OK; // the underlay carries more than endpoint traffic: not ours to judge
    int reason = lb_nat(skb, &f, 1);
    if (reason)
        return drop(skb, &f, 0, reason, 0, identity_of(f.saddr), 0, NULL);
    return ingress_redirect(skb, &f, identity_of(f.saddr));
}

int from_overlay(struct __sk_buff *skb) {
    struct bpf_tunnel_key key = {};
    if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0) {
        struct flow none = {.len = skb->len};
        return drop(skb, &none, 0, REASON_INVALID_SOURCE, 0, 0, 0, NULL);
    }
    u32 src_id = key.tunnel_id;
    if (src_id == IDENTITY_HOST)
        src_id = IDENTITY_REMOTE_NODE; // another node's own traffic
    // The inner frame is addressed to the sender's device (the tunnel device does no ARP): it is
    // for this node's stack, which routes it on to the endpoint.
    bpf_skb_change_type(skb, 0 /* PACKET_HOST */);
    skb->mark = MARK_MAGIC_IDENTITY | (src_id << 16);
    struct flow f = {};
    int p = parse(skb, &f);
    if (p == 1)
        return TC_ACT_OK;
    if (p < 0) {
        struct flow none = {.len = skb->len};
        return drop(skb, &none, 0, REASON_UNKNOWN_L3, 0, src_id, 0, NULL);
    }
    return ingress_redirect(skb, &f, src_id);
}

int to_overlay(struct __sk_buff *skb) {
    struct flow f = {};
    if (parse(skb, &f) != 0)
        return TC_ACT_SHOT; // only IPv4 is tunnelled
    struct ipcache_key k = {.prefixlen = 32, .addr = f.daddr};
    struct tunnel_val *node = tunnels.lookup(&k);
    if (!node)
        return drop(skb, &f, 1, REASON_INVALID_SOURCE, 0, 0, 0, NULL); // no node owns it: fail closed
    u32 src_id = IDENTITY_HOST; // the node itself, or Envoy's ingress upstream
    struct endpoint_val *src = endpoints.lookup(&f.saddr);
    if (src)
        src_id = src->identity;
    else if ((skb->mark & MARK_MAGIC_MASK) == MARK_PROXY_EGRESS && (skb->mark >> 16))
        src_id = skb->mark >> 16; // an egress proxy's upstream on an endpoint's behalf
    struct bpf_tunnel_key key = {};
    key.remote_ipv4 = bpf_ntohl(node->node_ip);
    key.tunnel_id = src_id;
    key.tunnel_ttl = 64;
    if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
        return TC_ACT_SHOT;
    return TC_ACT_OK;
}
