-- Argo CD health check for loraplex.io/LoRAAdapter (resource.customizations.health).
-- Healthy:     Ready=True and status.observedGeneration == metadata.generation.
-- Degraded:    phase Failed, Accepted=False, or Ready=False with a failure reason.
-- Progressing: anything else (Pending, Downloading, Loading, an older generation).
-- Written for Argo CD's Lua 5.1 (gopher-lua): no goto, no integer division.
local hs = {}

local failure_reasons = {
  BaseModelNotFound = true,
  RankExceedsMax = true,
  NoEffect = true,
  InvalidSource = true,
  InvalidSpec = true,
  NameConflict = true,
  IncompatibleBaseModel = true,
  UnsupportedAdapter = true,
  DownloadFailed = true,
  ChecksumMismatch = true,
  LoadFailed = true,
  RankMismatch = true,
  AdapterTooLarge = true,
  CacheFull = true,
  SourceNotAllowed = true,
  DownloadTimeout = true,
}

local function condition(status, ctype)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  local text = c.reason or fallback
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the loraplex operator to report status"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local accepted = condition(status, "Accepted")
local ready = condition(status, "Ready")
if accepted ~= nil and accepted.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(accepted, "Not accepted")
  return hs
end
if status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(ready, "phase Failed")
  return hs
end
if ready ~= nil and ready.status == "False" and failure_reasons[ready.reason] then
  hs.status = "Degraded"
  hs.message = describe(ready, "Not ready")
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready, "Ready")
  return hs
end

hs.status = "Progressing"
hs.message = describe(ready, "Phase " .. tostring(status.phase or "Pending"))
return hs
