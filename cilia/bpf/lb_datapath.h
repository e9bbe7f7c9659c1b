// Service load balancing, included by datapath.c after its helpers (parse, identity_of, drop).
//
// A packet to a service frontend (address, port, protocol) is DNATed to one backend *before*
// policy, so the sender's egress policy judges the backend's identity and port:
//   lb_services  frontend -> service id, algorithm, how many slots of its row are in use
//   lb_slots     one row of LB_TABLE_SIZE backend ids per service id (Maglev permutation table,
//                or a weighted sequence for random / weighted round-robin); mmapped by the agent.
//                Two ids per element: an mmapped array's elements are 8-byte aligned, so u32
//                values would leave holes; pairs make it one plain u32 array seen from user space
//   lb_backends  backend id -> address, port, state (ids are per service, so removing a backend
//                from one service never touches another's)
//   lb_ct        the client's tuple -> chosen backend: a connection never moves, even when its
//                backend is removed (it finishes) or the tables change under it
//   lb_revnat    the backend's reply tuple -> the frontend the client addressed (rewritten where
//                the reply leaves the node towards the client: to_endpoint, to_netdev)
//   lb_affinity  (client address, service) -> backend, for session affinity with a timeout
//   lb_rr        per-service round-robin position; lb_counters per-service counters
// NodePort: from_netdev/to_netdev on a node-facing device do the same for traffic from outside
// to a NodePort frontend (address 0.0.0.0 = any of the node's addresses).
//
// Keep the structs in step with cilia/bpf/lb.py; the flow hash with cilia/services/maglev.py.

#define LB_ALG_MAGLEV 0
#define LB_ALG_RANDOM 1
#define LB_ALG_WRR 2
#define LB_F_NODEPORT 1
#define LB_BACKEND_ACTIVE 0
#define REASON_NO_SERVICE_BACKEND 158 // a service without an active backend (Cilium's DROP_NO_SERVICE)

struct lb_svc_key {
    u32 addr;     // network order; 0.0.0.0 for a NodePort on every node address
    u16 port;     // network order
    u8 protocol;
    u8 pad;
};

struct lb_svc_val {
    u32 svc_id;
    u32 slots;        // entries of the service's lb_slots row in use; 0: no active backend
    u32 affinity_s;   // session affinity timeout; 0: none
    u8 algorithm;     // LB_ALG_*
    u8 flags;         // LB_F_*
    u16 pad;
};

struct lb_backend {
    u32 addr;
    u16 port;
    u8 state;        // LB_BACKEND_ACTIVE, else terminating / not ready (never chosen)
    u8 pad;
    u32 svc_id;
};

struct lb_ct_val {
    u32 backend_addr;
    u16 backend_port;
    u16 pad;
    u32 backend_id;
    u32 svc_id;
};

struct lb_rev_val {
    u32 addr;        // the frontend as the client addressed it (0: the tuple is a direct flow's now)
    u16 port;
    u16 pad;
    u32 svc_id;
};

struct lb_aff_key {
    u32 client;
    u32 svc_id;
};

struct lb_aff_val {
    u32 backend_id;
    u32 pad;
    u64 last_seen;
};

struct lb_slot_pair {
    u32 id[2];
};

struct lb_count {
    u64 connections;
    u64 packets;
    u64 bytes;
    u64 no_backend;
};

BPF_TABLE_PINNED("hash", struct lb_svc_key, struct lb_svc_val, lb_services, LB_SERVICES_MAX,
                 PIN_DIR "/lb_services");
BPF_TABLE_PINNED("hash", u32, struct lb_backend, lb_backends, LB_BACKENDS_MAX, PIN_DIR "/lb_backends");
BPF_TABLE_PINNED7("array", u32, struct lb_slot_pair, lb_slots, (LB_SERVICES_MAX * LB_TABLE_SIZE + 1) / 2,
                  PIN_DIR "/lb_slots",
                  BPF_F_MMAPABLE);
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct lb_ct_val, lb_ct, 262144, PIN_DIR "/lb_ct");
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct lb_rev_val, lb_revnat, 262144, PIN_DIR "/lb_revnat");
BPF_TABLE_PINNED("lru_hash", struct lb_aff_key, struct lb_aff_val, lb_affinity, 65536, PIN_DIR "/lb_affinity");
BPF_TABLE_PINNED("array", u32, u32, lb_rr, LB_SERVICES_MAX, PIN_DIR "/lb_rr");
BPF_TABLE_PINNED("array", u32, struct lb_count, lb_counters, LB_SERVICES_MAX, PIN_DIR "/lb_counters");

static __always_inline u32 lb_rotl(u32 x, u32 r) {
    return (x << r) | (x >> (32 - r));
}

static __always_inline u32 lb_mix(u32 h, u32 k) {
    k *= 0xcc9e2d51;
    k = lb_rotl(k, 15);
    k *= 0x1b873593;
    h ^= k;
    h = lb_rotl(h, 13);
    return h * 5 + 0xe6546b64;
}

// MurmurHash3's body and finalizer over the 5-tuple (words as they lie in the packet, read
// little-endian): the same function as maglev.flow_hash, so `policy trace` can predict a backend.
static __always_inline u32 lb_flow_hash(struct flow *f) {
    u32 h = 0x5eed;
    h = lb_mix(h, f->saddr);
    h = lb_mix(h, f->daddr);
    h = lb_mix(h, (u32)f->sport | ((u32)f->dport << 16));
    h = lb_mix(h, f->protocol);
    h ^= 16;
    h ^= h >> 16;
    h *= 0x85ebca6b;
    h ^= h >> 13;
    h *= 0xc2b2ae35;
    h ^= h >> 16;
    return h;
}

static __always_inline int lb_pick_slot(struct flow *f, struct lb_svc_val *svc, u32 *backend_id) {
    u32 slots = svc->slots;
    if (!slots || slots > LB_TABLE_SIZE || svc->svc_id >= LB_SERVICES_MAX)
        return -1;
    u32 slot;
    if (svc->algorithm == LB_ALG_MAGLEV) {
        slot = lb_flow_hash(f) % slots;
    } else if (svc->algorithm == LB_ALG_WRR) {
        u32 id = svc->svc_id;
        u32 *pos = lb_rr.lookup(&id);
        if (!pos)
            return -1;
        // Not atomic: two CPUs may take the same slot now and then; the sequence stays weighted.
        u32 n = *pos;
        *pos = n + 1;
        slot = n % slots;
    } else {
        slot = bpf_get_prandom_u32() % slots;
    }
    u32 at = svc->svc_id * LB_TABLE_SIZE + slot;
    u32 idx = at >> 1;
    struct lb_slot_pair *pair = lb_slots.lookup(&idx);
    if (!pair)
        return -1;
    u32 b = (at & 1) ? pair->id[1] : pair->id[0];
    if (!b)
        return -1;
    *backend_id = b;
    return 0;
}

static __always_inline struct lb_backend *lb_active(u32 backend_id, u32 svc_id) {
    struct lb_backend *b = lb_backends.lookup(&backend_id);
    if (!b || b->state != LB_BACKEND_ACTIVE || b->svc_id != svc_id)
        return NULL;
    return b;
}

// Choose a backend for a new connection: the client's affinity entry while it is fresh and its
// backend still active, else the service's algorithm.
static __always_inline struct lb_backend *lb_choose(struct flow *f, struct lb_svc_val *svc, u32 *backend_id) {
    struct lb_aff_key ak = {.client = f->saddr, .svc_id = svc->svc_id};
    u64 now = bpf_ktime_get_ns();
    if (svc->affinity_s) {
        struct lb_aff_val *av = lb_affinity.lookup(&ak);
        if (av && now - av->last_seen < (u64)svc->affinity_s * 1000000000ULL) {
            struct lb_backend *b = lb_active(av->backend_id, svc->svc_id);
            if (b) {
                av->last_seen = now;
                *backend_id = av->backend_id;
                return b;
            }
        }
    }
    if (lb_pick_slot(f, svc, backend_id) < 0)
        return NULL;
    struct lb_backend *b = lb_backends.lookup(backend_id);
    if (b && svc->affinity_s) {
        struct lb_aff_val av = {.backend_id = *backend_id, .last_seen = now};
        lb_affinity.update(&ak, &av);
    }
    return b;
}

// Rewrite one side of the packet's IPv4/L4 addressing, fixing both checksums.
static __always_inline int lb_rewrite(struct __sk_buff *skb, struct flow *f, int dst, u32 old_addr, u32 new_addr,
                                      u16 old_port, u16 new_port) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct iphdr *ip = data + sizeof(struct ethhdr);
    if ((void *)(ip + 1) > end)
        return -1;
    u32 l4 = sizeof(struct ethhdr) + ip->ihl * 4;
    u32 csum_off = l4 + (f->protocol == IPPROTO_TCP ? __builtin_offsetof(struct tcphdr, check) : __builtin_offsetof(struct udphdr, check));
    u64 mangled = f->protocol == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0; // UDP checksum 0: none, keep it
    u32 addr_off = sizeof(struct ethhdr) + (dst ? __builtin_offsetof(struct iphdr, daddr) : __builtin_offsetof(struct iphdr, saddr));
    u32 port_off = l4 + (dst ? 2 : 0);
    if (bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr, mangled | BPF_F_PSEUDO_HDR | 4) < 0)
        return -1;
    if (bpf_l3_csum_replace(skb, sizeof(struct ethhdr) + __builtin_offsetof(struct iphdr, check), old_addr, new_addr, 4) < 0)
        return -1;
    if (bpf_skb_store_bytes(skb, addr_off, &new_addr, 4, 0) < 0)
        return -1;
    if (old_port != new_port) {
        if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled | 2) < 0)
            return -1;
        if (bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0) < 0)
            return -1;
    }
    return 0;
}

// DNAT a packet addressed to a service frontend. Returns 0 (not a service, or rewritten: f then
// holds the backend as destination and the frontend in svc_addr/svc_port) or a drop reason.
static __always_inline int lb_nat(struct __sk_buff *skb, struct flow *f, int nodeport_only) {
    if (f->protocol != IPPROTO_TCP && f->protocol != IPPROTO_UDP)
        return 0;
    struct lb_svc_key k = {.addr = f->daddr, .port = f->dport, .protocol = f->protocol};
    struct lb_svc_val *svc = lb_services.lookup(&k);
    if (!svc) {
        k.addr = 0; // a NodePort on every node address
        svc = lb_services.lookup(&k);
        if (!svc || identity_of(f->daddr) != IDENTITY_HOST)
            return 0;
    }
    if (nodeport_only && !(svc->flags & LB_F_NODEPORT))
        return 0;
    u32 svc_id = svc->svc_id;
    struct lb_count *cnt = lb_counters.lookup(&svc_id);
    struct ct_key key = {.saddr = f->saddr, .daddr = f->daddr, .sport = f->sport, .dport = f->dport,
                         .protocol = f->protocol};
    struct lb_ct_val chosen = {};
    struct lb_ct_val *ct = lb_ct.lookup(&key);
    // A known flow keeps its backend; a SYN on a reused tuple too, unless that backend is gone.
    if (ct && (!f->syn || lb_active(ct->backend_id, svc_id))) {
        chosen = *ct;
        // Its reverse entry may since have been taken by another frontend's flow on the same
        // backend tuple (the client reused its port), or forgotten: make it ours again.
        struct ct_key rk = {.saddr = chosen.backend_addr, .daddr = f->saddr, .sport = chosen.backend_port,
                            .dport = f->sport, .protocol = f->protocol};
        // (A tuple a direct flow took is the service flow's again only with a SYN: a late ACK or
        // reset of the old connection must not rewrite the direct connection's replies.)
        struct lb_rev_val *rv = lb_revnat.lookup(&rk);
        if (!rv || ((rv->addr != f->daddr || rv->port != f->dport) && (rv->addr || f->syn))) {
            struct lb_rev_val fresh = {.addr = f->daddr, .port = f->dport, .svc_id = svc_id};
            lb_revnat.update(&rk, &fresh);
        }
    } else {
        u32 backend_id = 0;
        struct lb_backend *b = lb_choose(f, svc, &backend_id);
        if (!b) {
            if (cnt)
                __sync_fetch_and_add(&cnt->no_backend, 1);
            return REASON_NO_SERVICE_BACKEND;
        }
        chosen.backend_addr = b->addr;
        chosen.backend_port = b->port;
        chosen.backend_id = backend_id;
        chosen.svc_id = svc_id;
        lb_ct.update(&key, &chosen);
        struct ct_key rk = {.saddr = b->addr, .daddr = f->saddr, .sport = b->port, .dport = f->sport,
                            .protocol = f->protocol};
        struct lb_rev_val rv = {.addr = f->daddr, .port = f->dport, .svc_id = svc_id};
        lb_revnat.update(&rk, &rv);
        if (cnt)
            __sync_fetch_and_add(&cnt->connections, 1);
    }
    if (cnt) {
        __sync_fetch_and_add(&cnt->packets, 1);
        __sync_fetch_and_add(&cnt->bytes, f->len);
    }
    if (lb_rewrite(skb, f, 1, f->daddr, chosen.backend_addr, f->dport, chosen.backend_port) < 0)
        return REASON_NO_SERVICE_BACKEND;
    f->svc_addr = f->daddr;
    f->svc_port = f->dport;
    f->svc_id = svc_id;
    f->daddr = chosen.backend_addr;
    f->dport = chosen.backend_port;
    return 0;
}

// A backend's reply on its way to the client: make it come from the frontend the client used.
static __always_inline void lb_rev_nat(struct __sk_buff *skb, struct flow *f) {
    if (f->protocol != IPPROTO_TCP && f->protocol != IPPROTO_UDP)
        return;
    struct ct_key k = {.saddr = f->saddr, .daddr = f->daddr, .sport = f->sport, .dport = f->dport,
                       .protocol = f->protocol};
    struct lb_rev_val *r = lb_revnat.lookup(&k);
    if (!r || !r->addr)
        return;
    lb_rewrite(skb, f, 0, f->saddr, r->addr, f->sport, r->port);
}

// A new flow that is not a service's: a reverse NAT entry left by an earlier service connection
// on the same 4-tuple (the client reused its port) must not rewrite this flow's replies. The entry
// is kept, emptied, so the old connection's late packets (its last ACK) do not make it again.
static __always_inline void lb_forget(struct flow *f) {
    if (f->svc_id || (f->protocol != IPPROTO_TCP && f->protocol != IPPROTO_UDP))
        return;
    struct ct_key rk = {.saddr = f->daddr, .daddr = f->saddr, .sport = f->dport, .dport = f->sport,
                        .protocol = f->protocol};
    struct lb_rev_val *rv = lb_revnat.lookup(&rk);
    if (rv) {
        rv->addr = 0;
        rv->port = 0;
    }
}

// tc ingress of a node-facing device (--nodeport-device): NodePort traffic from outside. Anything
// else passes untouched: the host's own traffic is not this program's to judge.
int from_netdev(struct __sk_buff *skb) {
    struct flow f = {};
    if (parse(skb, &f) != 0)
        return TC_ACT_OK;
    int reason = lb_nat(skb, &f, 1);
    if (reason)
        return drop(skb, &f, 0, reason, 0, identity_of(f.saddr), 0, NULL);
    return TC_ACT_OK;
}

// tc egress of the same device: replies of NodePort backends leave from the node's address.
int to_netdev(struct __sk_buff *skb) {
    struct flow f = {};
    if (parse(skb, &f) == 0)
        lb_rev_nat(skb, &f);
    return TC_ACT_OK;
}
