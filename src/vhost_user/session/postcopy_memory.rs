// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Postcopy (`PAGEFAULT`) memory requests: tables and regions mapped and
//! registered while listening, their replies and the frontend's acks.

use super::*;

/// Postcopy (`PAGEFAULT`): the memory-table replies and their acks.
impl<B: DeviceBackend> Session<'_, B> {
    /// Whether `req` owes the frontend its mapping addresses: a memory
    /// update (not an ack) while postcopy is listening.
    #[cfg(feature = "postcopy")]
    pub(super) fn postcopy_region_reply_owed(&self, req: FrontendReq, msg: &Message) -> bool {
        self.postcopy.is_listening()
            && matches!(req, FrontendReq::SET_MEM_TABLE | FrontendReq::ADD_MEM_REG)
            && !self.is_postcopy_ack(req, msg)
    }

    #[cfg(not(feature = "postcopy"))]
    pub(super) fn postcopy_region_reply_owed(&self, _req: FrontendReq, _msg: &Message) -> bool {
        false
    }

    #[cfg(feature = "postcopy")]
    pub(super) fn require_pagefault(&self) -> Result<(), RequestError> {
        if self.acked_protocol & VhostUserProtocolFeatures::PAGEFAULT.bits() == 0 {
            return Err(PostcopyError::NotNegotiated.into());
        }
        Ok(())
    }

    /// While listening, the frontend acknowledges the mapping addresses
    /// with the same request, no fds and a u64 status (QEMU) or nothing.
    #[cfg(feature = "postcopy")]
    pub(super) fn is_postcopy_ack(&self, req: FrontendReq, msg: &Message) -> bool {
        let len = msg.payload.len();
        self.postcopy.is_listening()
            && msg.files.is_empty()
            && match req {
                FrontendReq::SET_MEM_TABLE => len == 0 || len == 8,
                FrontendReq::ADD_MEM_REG | FrontendReq::REM_MEM_REG => len == 8,
                _ => false,
            }
    }

    /// The ack: the frontend can now resolve faults on the new mappings, so
    /// the device may use them. A non-zero status drops them.
    #[cfg(feature = "postcopy")]
    pub(super) fn postcopy_ack(&mut self, req: FrontendReq, msg: &Message) -> RequestResult {
        let status = if msg.payload.len() == 8 {
            parse::<VhostUserU64>(req, &msg.payload)?.value
        } else {
            0
        };
        match self.postcopy.take_pending() {
            None => debug!("{req:?} postcopy ack with nothing pending"),
            Some(_) if status != 0 => {
                warn!("frontend refused the postcopy mappings (status {status}); dropped");
            }
            Some(PendingMemory::Replace(mapped)) => self.install_table(mapped)?,
            Some(PendingMemory::Add(list)) => {
                for mapped in list {
                    self.install_region(mapped)?;
                }
            }
        }
        Ok(Outcome::Ack)
    }

    /// SET_MEM_TABLE while listening: register the new mappings, park them
    /// until the ack, and reply with the request's table where each user
    /// address is replaced by where this process mapped the region.
    #[cfg(feature = "postcopy")]
    pub(super) fn postcopy_mem_table(
        &mut self,
        header: &[u8],
        mapped: Vec<MappedRegion>,
    ) -> RequestResult {
        let mut reply = header.to_vec();
        for m in &mapped {
            self.postcopy.register(m)?;
            let r = VhostUserMemoryRegion::new(m.gpa, m.size, m.host_addr(), m.mmap_offset);
            reply.extend_from_slice(r.as_slice());
        }
        self.postcopy.set_pending(PendingMemory::Replace(mapped));
        Ok(Outcome::Reply(reply))
    }

    /// ADD_MEM_REG while listening: the same, for one region.
    #[cfg(feature = "postcopy")]
    pub(super) fn postcopy_add_region(&mut self, mapped: MappedRegion) -> RequestResult {
        self.postcopy.register(&mapped)?;
        let reply = VhostUserSingleMemoryRegion::new(
            mapped.gpa,
            mapped.size,
            mapped.host_addr(),
            mapped.mmap_offset,
        );
        self.postcopy.add_pending(mapped);
        Ok(Outcome::Reply(reply.as_slice().to_vec()))
    }

    #[cfg(feature = "postcopy")]
    pub(super) fn postcopy_advise(&mut self) -> RequestResult {
        self.require_pagefault()?;
        let fd = self.postcopy.advise()?;
        Ok(Outcome::ReplyWithFd(Vec::new(), fd))
    }

    #[cfg(feature = "postcopy")]
    pub(super) fn postcopy_listen(&mut self) -> RequestResult {
        self.require_pagefault()?;
        self.postcopy.listen(&self.regions.host_ranges())?;
        Ok(Outcome::Ack)
    }

    #[cfg(feature = "postcopy")]
    pub(super) fn postcopy_end(&mut self) -> RequestResult {
        self.require_pagefault()?;
        self.postcopy.end()?;
        Ok(u64_reply(0))
    }

    #[cfg(not(feature = "postcopy"))]
    pub(super) fn postcopy_advise(&mut self) -> RequestResult {
        Err(RequestError::Unsupported(
            FrontendReq::POSTCOPY_ADVISE.into(),
        ))
    }

    #[cfg(not(feature = "postcopy"))]
    pub(super) fn postcopy_listen(&mut self) -> RequestResult {
        Err(RequestError::Unsupported(
            FrontendReq::POSTCOPY_LISTEN.into(),
        ))
    }

    #[cfg(not(feature = "postcopy"))]
    pub(super) fn postcopy_end(&mut self) -> RequestResult {
        Err(RequestError::Unsupported(FrontendReq::POSTCOPY_END.into()))
    }
}
