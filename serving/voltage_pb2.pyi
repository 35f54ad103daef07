# ruff: noqa
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("ion", "structure", "format", "material_id", "explain", "discharged_structure", "discharged_format")
    ION_FIELD_NUMBER: _ClassVar[int]
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    MATERIAL_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    DISCHARGED_STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    DISCHARGED_FORMAT_FIELD_NUMBER: _ClassVar[int]
    ion: str
    structure: str
    format: str
    material_id: str
    explain: bool
    discharged_structure: str
    discharged_format: str
    def __init__(self, ion: _Optional[str] = ..., structure: _Optional[str] = ..., format: _Optional[str] = ..., material_id: _Optional[str] = ..., explain: _Optional[bool] = ..., discharged_structure: _Optional[str] = ..., discharged_format: _Optional[str] = ...) -> None: ...

class LocalVoltage(_message.Message):
    __slots__ = ("site", "element", "local_voltage")
    SITE_FIELD_NUMBER: _ClassVar[int]
    ELEMENT_FIELD_NUMBER: _ClassVar[int]
    LOCAL_VOLTAGE_FIELD_NUMBER: _ClassVar[int]
    site: int
    element: str
    local_voltage: float
    def __init__(self, site: _Optional[int] = ..., element: _Optional[str] = ..., local_voltage: _Optional[float] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    source: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("ion", "voltage", "uncertainty", "model", "formula", "n_sites", "unseen_elements", "warnings", "material_id", "reference_voltage", "local_voltages", "physics_voltage")
    ION_FIELD_NUMBER: _ClassVar[int]
    VOLTAGE_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FORMULA_FIELD_NUMBER: _ClassVar[int]
    N_SITES_FIELD_NUMBER: _ClassVar[int]
    UNSEEN_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    MATERIAL_ID_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_VOLTAGE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_VOLTAGES_FIELD_NUMBER: _ClassVar[int]
    PHYSICS_VOLTAGE_FIELD_NUMBER: _ClassVar[int]
    ion: str
    voltage: float
    uncertainty: float
    model: ModelRef
    formula: str
    n_sites: int
    unseen_elements: _containers.RepeatedScalarFieldContainer[str]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    material_id: str
    reference_voltage: float
    local_voltages: _containers.RepeatedCompositeFieldContainer[LocalVoltage]
    physics_voltage: float
    def __init__(self, ion: _Optional[str] = ..., voltage: _Optional[float] = ..., uncertainty: _Optional[float] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., formula: _Optional[str] = ..., n_sites: _Optional[int] = ..., unseen_elements: _Optional[_Iterable[str]] = ..., warnings: _Optional[_Iterable[str]] = ..., material_id: _Optional[str] = ..., reference_voltage: _Optional[float] = ..., local_voltages: _Optional[_Iterable[_Union[LocalVoltage, _Mapping]]] = ..., physics_voltage: _Optional[float] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("kind", "message", "http_status", "request_id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    kind: str
    message: str
    http_status: int
    request_id: str
    def __init__(self, kind: _Optional[str] = ..., message: _Optional[str] = ..., http_status: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class PredictBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[PredictRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[PredictRequest, _Mapping]]] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("index", "prediction", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    prediction: Prediction
    error: Error
    def __init__(self, index: _Optional[int] = ..., prediction: _Optional[_Union[Prediction, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class PredictBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchResult, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("ion", "loaded", "disabled", "model", "run_id", "test_mae", "loaded_at", "backbone")
    ION_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TEST_MAE_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    ion: str
    loaded: bool
    disabled: bool
    model: ModelRef
    run_id: str
    test_mae: float
    loaded_at: str
    backbone: str
    def __init__(self, ion: _Optional[str] = ..., loaded: _Optional[bool] = ..., disabled: _Optional[bool] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., run_id: _Optional[str] = ..., test_mae: _Optional[float] = ..., loaded_at: _Optional[str] = ..., backbone: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...
