"""Applies vhost-user requests to a device: features, memory, vrings, status.

This is the back-end's request table in code. It runs in the connection's trio
task but never awaits: each request is applied whole before the next one, and
the queue workers only touch a queue between their own checkpoints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ...backend.device import DeviceState
from ...backend.errors import DeviceError, GuestMemoryError, OutboardError, RemoteProtocolError
from ...backend.memory import GuestMemory, MemoryRegion, RegionSpec
from ...backend.runtime import Runtime
from ...backend.virtio import DeviceStatus
from .connection import BackendConnection, Request, pack_u64
from .wire import (
    MAX_CONFIG_SIZE,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigHeader,
    FrontendReq,
    MemoryRegionDescription,
    VringState,
)

__all__ = ["MAX_MEM_SLOTS", "VhostUserBackend"]

log = logging.getLogger("outboard.vhost_user")

#: what GET_MAX_MEM_SLOTS answers
MAX_MEM_SLOTS = 32


@dataclass
class _VringAddr:
    desc_uva: int
    avail_uva: int
    used_uva: int


def _spec(desc: MemoryRegionDescription) -> RegionSpec:
    return RegionSpec(gpa=desc.guest_phys_addr, size=desc.memory_size,
                      uva=desc.userspace_addr, mmap_offset=desc.mmap_offset)


class VhostUserBackend:
    """One connection's view of the device."""

    def __init__(self, state: DeviceState, runtime: Runtime, conn: BackendConnection) -> None:
        self.state = state
        self.runtime = runtime
        self.conn = conn
        self.memory = GuestMemory()
        self.owner = False
        self.protocol_features_acked = False
        self._addrs: dict[int, _VringAddr] = {}
        #: rings whose state came from SET_VRING_ENABLE
        self._explicit_enable: set[int] = set()
        #: ADD_MEM_REG of a region already mapped (QEMU sends one per queue pair)
        self._region_refs: dict[RegionSpec, int] = {}
        self._handlers = {
            FrontendReq.GET_FEATURES: self._get_features,
            FrontendReq.SET_FEATURES: self._set_features,
            FrontendReq.SET_OWNER: self._set_owner,
            FrontendReq.RESET_OWNER: self._reset_owner,
            FrontendReq.SET_MEM_TABLE: self._set_mem_table,
            FrontendReq.SET_VRING_NUM: self._set_vring_num,
            FrontendReq.SET_VRING_ADDR: self._set_vring_addr,
            FrontendReq.SET_VRING_BASE: self._set_vring_base,
            FrontendReq.GET_VRING_BASE: self._get_vring_base,
            FrontendReq.SET_VRING_KICK: self._set_vring_kick,
            FrontendReq.SET_VRING_CALL: self._set_vring_call,
            FrontendReq.SET_VRING_ERR: self._set_vring_err,
            FrontendReq.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            FrontendReq.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            FrontendReq.GET_QUEUE_NUM: self._get_queue_num,
            FrontendReq.SET_VRING_ENABLE: self._set_vring_enable,
            FrontendReq.GET_CONFIG: self._get_config,
            FrontendReq.SET_CONFIG: self._set_config,
            FrontendReq.RESET_DEVICE: self._reset_device,
            FrontendReq.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            FrontendReq.ADD_MEM_REG: self._add_mem_reg,
            FrontendReq.REM_MEM_REG: self._rem_mem_reg,
            FrontendReq.SET_STATUS: self._set_status,
            FrontendReq.GET_STATUS: self._get_status,
        }

    # -- dispatch ----------------------------------------------------------

    def dispatch(self, req: Request) -> bytes | None:
        """Apply ``req``; return the bytes to send back, if any.

        A request that fails gets an error reply where the protocol has one
        (REPLY_ACK, an empty GET_CONFIG); otherwise the failure is raised as a
        fatal RemoteProtocolError and the connection must be dropped.
        """
        log.debug("<- %s flags=%#x size=%d fds=%d", req.request.name, req.flags,
                  len(req.payload), len(req.fds))
        try:
            handler = self._handlers.get(req.request)
            if handler is None or not req.rule.implemented:
                raise DeviceError("not supported by this back-end")
            payload = handler(req)
        except OutboardError as exc:
            req.close()
            return self.refuse(req, exc)
        finally:
            req.close()  # any fd a handler did not take
        if payload is not None:
            return self.conn.reply(req, payload)
        return self.conn.ack(req, True)

    def refuse(self, req: Request, exc: OutboardError) -> bytes | None:
        """The answer to a request that failed, or raise to drop the connection."""
        message = f"{req.request.name}: {exc}" if not str(exc).startswith(req.request.name) \
            else str(exc)
        if req.request is FrontendReq.GET_CONFIG:
            log.warning("%s (answered with an empty config)", message)
            head = ConfigHeader.from_buffer_copy(req.payload[:12].ljust(12, b"\0"))
            head.size = 0
            return self.conn.reply(req, bytes(head))
        nack = self.conn.ack(req, False)
        if nack is not None:
            log.warning("%s (refused)", message)
            return nack
        raise RemoteProtocolError(f"{message}; the front-end cannot be told, dropping it")

    # -- features ----------------------------------------------------------

    def _get_features(self, req: Request) -> bytes:
        return pack_u64(self.state.offered | 1 << VHOST_USER_F_PROTOCOL_FEATURES)

    def _set_features(self, req: Request) -> None:
        features = req.u64
        acked = bool(features >> VHOST_USER_F_PROTOCOL_FEATURES & 1)
        self.state.set_features(features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES))
        self.protocol_features_acked = acked
        # "Ring states": with protocol features a ring starts disabled until
        # SET_VRING_ENABLE, without them enabled. Running rings keep their state
        # (the front-end re-sends features to toggle dirty logging).
        # A ring the front-end already enabled or disabled keeps that state:
        # QEMU enables a net device's rings before SET_FEATURES.
        for index, runner in enumerate(self.runtime.runners):
            if not runner.running and index not in self._explicit_enable:
                runner.enabled = not self.protocol_features_acked
        self.runtime.refresh()

    def _get_protocol_features(self, req: Request) -> bytes:
        return pack_u64(self.conn.offered_protocol_features)

    def _set_protocol_features(self, req: Request) -> None:
        pass  # the connection core records them

    def _set_owner(self, req: Request) -> None:
        self.owner = True

    def _reset_owner(self, req: Request) -> None:
        # Deprecated; the spec recommends ignoring it or disabling the rings.
        for runner in self.runtime.runners:
            runner.enabled = False

    def _get_queue_num(self, req: Request) -> bytes:
        return pack_u64(self.state.num_queues)

    # -- memory ------------------------------------------------------------

    def _set_mem_table(self, req: Request) -> None:
        regions: list[MemoryRegion] = []
        try:
            for desc in req.regions:
                regions.append(MemoryRegion.map(_spec(desc), req.fds.pop(0)))
            memory = GuestMemory(regions)
        except BaseException:
            for region in regions:
                region.release()
            raise
        old, self.memory = self.memory, memory
        self._region_refs = {r.spec: 1 for r in memory}
        self._remap_queues()
        old.clear()
        log.info("memory table: %s", ", ".join(
            f"gpa {r.gpa:#x}+{r.size:#x}" for r in memory) or "empty")

    def _add_mem_reg(self, req: Request) -> None:
        fd = req.take_fd()
        assert fd is not None
        spec = _spec(req.regions[0])
        if spec in self._region_refs:
            # The same region again: counted, not mapped twice.
            fd.close()
            self._region_refs[spec] += 1
            return
        if len(self.memory) >= MAX_MEM_SLOTS:
            fd.close()
            raise DeviceError(f"all {MAX_MEM_SLOTS} memory slots are in use")
        region = MemoryRegion.map(_spec(req.regions[0]), fd)
        try:
            self.memory.add(region)
        except GuestMemoryError:
            region.release()
            raise
        self._region_refs[spec] = 1
        self._remap_queues()

    def _rem_mem_reg(self, req: Request) -> None:
        spec = _spec(req.regions[0])
        known = {(r.gpa, r.size, r.uva): r.spec for r in self.memory}
        full = known.get((spec.gpa, spec.size, spec.uva))
        if full is not None and self._region_refs.get(full, 1) > 1:
            self._region_refs[full] -= 1
            return
        region = self.memory.remove(spec.gpa, spec.size, spec.uva)
        self._region_refs.pop(region.spec, None)
        self._remap_queues()
        region.release()

    def _get_max_mem_slots(self, req: Request) -> bytes:
        return pack_u64(MAX_MEM_SLOTS)

    def _remap_queues(self) -> None:
        """Translate every configured ring again against the current table."""
        for index, addr in self._addrs.items():
            queue = self.state.queues[index]
            queue.release()
            try:
                self._setup_queue(index, addr)
            except GuestMemoryError as exc:
                # The ring left guest memory; the queue stays down until readdressed.
                self.runtime.runners[index].stop()
                log.warning("queue %d: rings no longer mapped: %s", index, exc)
        self.runtime.refresh()

    # -- vrings ------------------------------------------------------------

    def _vring(self, index: int) -> int:
        self.state.queue(index)
        return index

    def _set_vring_num(self, req: Request) -> None:
        state = req.state
        queue = self.state.queue(state.index)
        if self.runtime.runners[state.index].running:
            raise DeviceError(f"queue {state.index} is running")
        old_size = queue.size
        try:
            queue.set_size(state.num)
            addr = self._addrs.get(state.index)
            if addr is not None:
                # The rings are already placed: lay them out again at the new size.
                queue.release()
                self._setup_queue(state.index, addr)
        except OutboardError as exc:
            queue.size = old_size
            addr = self._addrs.get(state.index)
            if addr is not None:
                queue.release()
                try:
                    self._setup_queue(state.index, addr)
                except OutboardError:
                    del self._addrs[state.index]
            raise DeviceError(str(exc)) from None

    def _setup_queue(self, index: int, addr: _VringAddr) -> None:
        memory = self.memory
        size = self.state.queues[index].size
        desc = memory.uva_to_gpa(addr.desc_uva, 16 * size)
        avail = memory.uva_to_gpa(addr.avail_uva, 6 + 2 * size)
        used = memory.uva_to_gpa(addr.used_uva, 6 + 8 * size)
        self.state.queues[index].setup(memory, desc, avail, used)

    def _set_vring_addr(self, req: Request) -> None:
        a = req.address
        index = self._vring(a.index)
        if self.runtime.runners[index].running:
            raise DeviceError(f"queue {index} is running")
        addr = _VringAddr(a.desc_user_addr, a.avail_user_addr, a.used_user_addr)
        self._setup_queue(index, addr)
        self._addrs[index] = addr

    def _set_vring_base(self, req: Request) -> None:
        state = req.state
        queue = self.state.queue(state.index)
        if self.runtime.runners[state.index].running:
            raise DeviceError(f"queue {state.index} is running")
        if state.num > 0xFFFF:
            raise DeviceError(f"base {state.num} does not fit a split ring index")
        queue.last_avail_idx = state.num

    def _get_vring_base(self, req: Request) -> bytes:
        index = self._vring(req.state.index)
        runner = self.runtime.runners[index]
        # "Ring states": GET_VRING_BASE stops the ring.
        runner.stop()
        queue = self.state.queues[index]
        base = queue.last_avail_idx
        if runner.kick is not None:
            runner.kick.close()
            runner.kick = None
        log.info("queue %d stopped at %d (%d interrupts)", index, base, runner.interrupts)
        return bytes(VringState(index, base))

    def _set_vring_kick(self, req: Request) -> None:
        index = self._vring(req.vring_index)
        runner = self.runtime.runners[index]
        queue = self.state.queues[index]
        if not queue.ready:
            raise DeviceError(f"queue {index} has no ring addresses")
        runner.stop()
        if runner.kick is not None:
            runner.kick.close()
        runner.kick = req.take_fd()
        queue.sync_used_idx()
        if self.protocol_features_acked is False:
            runner.enabled = True
        self.runtime.start(index)
        log.info("queue %d started: size %d, base %d%s", index, queue.size,
                 queue.last_avail_idx, "" if runner.enabled else " (disabled)")

    def _set_vring_call(self, req: Request) -> None:
        index = self._vring(req.vring_index)
        self.runtime.runners[index].set_call(req.take_fd())

    def _set_vring_err(self, req: Request) -> None:
        index = self._vring(req.vring_index)
        self.runtime.runners[index].set_err(req.take_fd())

    def _set_vring_enable(self, req: Request) -> None:
        state = req.state
        index = self._vring(state.index)
        if state.num not in (0, 1):
            raise DeviceError(f"enable value {state.num}")
        runner = self.runtime.runners[index]
        runner.enabled = bool(state.num)
        self._explicit_enable.add(index)
        if runner.enabled:
            self.runtime.kick(index)

    # -- config and status -------------------------------------------------

    def _get_config(self, req: Request) -> bytes:
        head, _ = req.config
        # Fields past the device's layout read as zero: a newer front-end may
        # know a longer config struct (the size is capped by the core).
        config = self.state.device.config()
        if not config:
            raise DeviceError("the device has no config space")
        config = config.ljust(MAX_CONFIG_SIZE, b"\0")
        if head.offset + head.size > len(config):
            raise DeviceError(f"read of {head.size} bytes at {head.offset} past the config")
        return bytes(head) + config[head.offset:head.offset + head.size]

    def _set_config(self, req: Request) -> None:
        head, data = req.config
        self.state.device.write_config(head.offset, data)
        self.runtime.refresh()

    def _set_status(self, req: Request) -> None:
        value = req.u64
        if value == 0:
            # QEMU before 8.1 sends SET_STATUS 0 when it stops the device, and
            # only then GET_VRING_BASE: the rings stop here but keep their
            # positions, which GET_VRING_BASE must still report. Configuration
            # the driver set (features, the blk cache mode) survives a VM pause;
            # a real reset comes as RESET_DEVICE or a fresh SET_VRING_BASE.
            self.runtime.stop_all()
            self.state.status = DeviceStatus(0)
            return
        self.state.set_status(value)
        self.runtime.refresh()

    def _get_status(self, req: Request) -> bytes:
        return pack_u64(int(self.state.status))

    def _reset_device(self, req: Request) -> None:
        self.reset()

    def reset(self) -> None:
        """Stop and forget every queue; the device back to its initial state."""
        self.runtime.close()
        self._addrs.clear()
        self._explicit_enable.clear()
        self.state.reset()
        for runner in self.runtime.runners:
            runner.enabled = not self.protocol_features_acked

    def close(self) -> None:
        """The connection is gone: release everything it held."""
        self.runtime.close()
        self._addrs.clear()
        self.state.reset()
        self.memory.clear()
